//! The routes and their handlers. Each handler is one call into the library (a cached read) or one plain
//! sqlx query on `&CachedPgPool` (a write: its keys are invalidated before the query returns).

use axum::extract::{FromRef, Path, State};
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::get;
use axum::{Json, Router};
use cache_runtime::{CachedPgPool, LoadOptions, key};
use serde::{Deserialize, Serialize};

use crate::counters::Counters;
use crate::error::AppError;
use crate::shop_model::{Category, Page, Product};

/// What the handlers share.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    /// The cached pool: reads through its cache, writes through it as through a `PgPool`.
    pub(crate) pool: CachedPgPool,
    /// The invalidations, which `Cache::stats` does not count (they are the pool's, not the cache's).
    pub(crate) counters: Counters,
}

impl FromRef<AppState> for CachedPgPool {
    fn from_ref(state: &AppState) -> Self {
        state.pool.clone()
    }
}

/// The routes of the service, behind the read-your-writes token layer: a write's response carries its
/// token (`x-cache-token` header and `cache_token` cookie), and a request carrying one reads nothing
/// older than that write, on whichever instance serves it.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/stats", get(stats))
        .route("/products/{id}", get(product))
        .route("/products/{id}/page", get(page))
        .route("/categories/{id}/products", get(category_products))
        .route("/categories/{id}/products/page/{page}", get(category_page))
        .route("/admin/products", axum::routing::post(create_product))
        .route(
            "/admin/products/{id}",
            axum::routing::put(update_product).delete(delete_product),
        )
        .route(
            "/admin/categories/{id}",
            axum::routing::put(rename_category),
        )
        .with_state(state)
        .layer(cache_runtime::layer::TokenLayer::new())
}

/// `GET /`: a page showing the counters live (it polls `/stats` every second).
async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

/// The body of `GET /stats`: the cache's counters.
#[derive(Debug, Serialize)]
struct StatsBody {
    /// Reads answered by a valid entry.
    hits: u64,
    /// Reads that found no valid entry.
    misses: u64,
    /// Keys invalidated in the store (after commits through the pool, and by the relay).
    invalidations: u64,
    /// Loader calls.
    loads: u64,
    /// Reads that shared another read's load.
    coalesced: u64,
    /// Values stored after a load.
    fills: u64,
    /// Fills refused because the key was invalidated during the load.
    fills_rejected: u64,
    /// Loaded values not stored (a tag new to the store, or not encodable).
    fills_skipped: u64,
    /// Entries found invalid through a tag.
    stale: u64,
    /// Reads that waited for another reader's lease.
    lease_waits: u64,
    /// Failed store operations (the read fell through to the database).
    store_errors: u64,
    /// Reads that skipped the store (breaker open, or the post-outage gate closed).
    bypassed: u64,
}

/// `GET /stats`.
async fn stats(State(state): State<AppState>) -> Json<StatsBody> {
    let s = state.pool.cache().stats();
    Json(StatsBody {
        hits: s.hits,
        misses: s.misses,
        invalidations: state.counters.invalidations(),
        loads: s.loads,
        coalesced: s.coalesced,
        fills: s.fills,
        fills_rejected: s.fills_rejected,
        fills_skipped: s.fills_skipped,
        stale: s.stale,
        lease_waits: s.lease_waits,
        store_errors: s.store_errors,
        bypassed: s.bypassed,
    })
}

/// `GET /products/{id}`: the product, cached under `product:<id>` (a missing one as a tombstone).
async fn product(
    State(pool): State<CachedPgPool>,
    Path(id): Path<i64>,
) -> Result<Json<Product>, AppError> {
    pool.get::<Product>(&id)
        .await?
        .map(Json)
        .ok_or(AppError::NotFound)
}

/// `GET /products/{id}/page`: the product joined with its category, cached under `product:<id>:page` and
/// tagged with `category:<category_id>`, so that renaming the category invalidates it too.
async fn page(
    State(pool): State<CachedPgPool>,
    Path(id): Path<i64>,
) -> Result<Json<Page>, AppError> {
    let load = || async {
        let page: Option<Page> = sqlx::query_as(
            "SELECT p.id, p.name, p.price_cents, p.category_id, c.name AS category
             FROM products p JOIN categories c ON c.id = p.category_id WHERE p.id = $1",
        )
        .bind(id)
        .fetch_optional(&pool)
        .await?;
        let tags = page
            .iter()
            .map(|p| key!("category:<id>", id = p.category_id))
            .collect();
        Ok::<_, sqlx::Error>((page, tags))
    };
    pool.cache()
        .get_or_load_tagged(key!("product:<id>:page", id), LoadOptions::new(), load)
        .await?
        .map(Json)
        .ok_or(AppError::NotFound)
}

/// `GET /categories/{id}/products`: the category's products by id, cached under
/// `category:<category_id>:products` (an unknown category has none).
async fn category_products(
    State(pool): State<CachedPgPool>,
    Path(category_id): Path<i64>,
) -> Result<Json<Vec<Product>>, AppError> {
    let products = pool
        .cache()
        .try_get_with(key!("category:<category_id>:products", category_id), || {
            sqlx::query_as("SELECT * FROM products WHERE category_id = $1 ORDER BY id")
                .bind(category_id)
                .fetch_all(&pool)
        })
        .await?;
    Ok(Json(products))
}

/// Products per page of a category's list.
const PAGE_SIZE: i64 = 2;

/// `GET /categories/{id}/products/page/{page}`: one page (from 1) of the category's list, cached under the
/// variant `category:<category_id>:products:page:<page>`: a write to any product of the category
/// invalidates every page with the list, in one store operation.
async fn category_page(
    State(pool): State<CachedPgPool>,
    Path((category_id, page)): Path<(i64, i64)>,
) -> Result<Json<Vec<Product>>, AppError> {
    let key = key!(
        "category:<category_id>:products:page:<page>",
        category_id,
        page
    );
    let products = pool
        .cache()
        .try_get_with(key, || {
            sqlx::query_as(
                "SELECT * FROM products WHERE category_id = $1 ORDER BY id LIMIT $2 OFFSET $3",
            )
            .bind(category_id)
            .bind(PAGE_SIZE)
            .bind((page.max(1) - 1) * PAGE_SIZE)
            .fetch_all(&pool)
        })
        .await?;
    Ok(Json(products))
}

/// The body of `POST /admin/products`.
#[derive(Debug, Deserialize)]
struct NewProduct {
    /// The id; by default the next of the table's identity.
    id: Option<i64>,
    category_id: i64,
    name: String,
    price_cents: i64,
}

/// `POST /admin/products`: creates a product (`201` with it); removes a tombstone cached for its id.
async fn create_product(
    State(pool): State<CachedPgPool>,
    Json(new): Json<NewProduct>,
) -> Result<(StatusCode, Json<Product>), AppError> {
    let product = sqlx::query_as(
        "INSERT INTO products (id, category_id, name, price_cents)
         VALUES (coalesce($1, nextval(pg_get_serial_sequence('products', 'id'))), $2, $3, $4)
         RETURNING *",
    )
    .bind(new.id)
    .bind(new.category_id)
    .bind(new.name)
    .bind(new.price_cents)
    .fetch_one(&pool)
    .await?;
    Ok((StatusCode::CREATED, Json(product)))
}

/// The body of `PUT /admin/products/{id}`: the fields to change.
#[derive(Debug, Deserialize)]
struct ProductChange {
    category_id: Option<i64>,
    name: Option<String>,
    price_cents: Option<i64>,
}

/// `PUT /admin/products/{id}`: changes the given fields (the product moves when `category_id` is given);
/// answers with the product as it is now.
async fn update_product(
    State(pool): State<CachedPgPool>,
    Path(id): Path<i64>,
    Json(change): Json<ProductChange>,
) -> Result<Json<Product>, AppError> {
    sqlx::query_as(
        "UPDATE products SET category_id = coalesce($2, category_id), name = coalesce($3, name),
                             price_cents = coalesce($4, price_cents)
         WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(change.category_id)
    .bind(change.name)
    .bind(change.price_cents)
    .fetch_optional(&pool)
    .await?
    .map(Json)
    .ok_or(AppError::NotFound)
}

/// `DELETE /admin/products/{id}`: `204`, or `404` when there was no such product.
async fn delete_product(
    State(pool): State<CachedPgPool>,
    Path(id): Path<i64>,
) -> Result<StatusCode, AppError> {
    let done = sqlx::query("DELETE FROM products WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(AppError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `PUT /admin/categories/{id}`.
#[derive(Debug, Deserialize)]
struct CategoryChange {
    name: String,
}

/// `PUT /admin/categories/{id}`: renames the category; the pages that joined it are invalidated through
/// their tag.
async fn rename_category(
    State(pool): State<CachedPgPool>,
    Path(id): Path<i64>,
    Json(change): Json<CategoryChange>,
) -> Result<Json<Category>, AppError> {
    sqlx::query_as("UPDATE categories SET name = $2 WHERE id = $1 RETURNING *")
        .bind(id)
        .bind(change.name)
        .fetch_optional(&pool)
        .await?
        .map(Json)
        .ok_or(AppError::NotFound)
}
