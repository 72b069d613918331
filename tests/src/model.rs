//! Entities shared by the test binaries (a separate crate from the tests, so `key!` is exercised across
//! crates).

use cache_runtime::CachedEntity;

/// A category row.
#[derive(Debug, Clone, PartialEq, CachedEntity, sqlx::FromRow)]
#[cached_entity(table = "categories", key = "category:<id>", depends = ["category:<id>:products"])]
pub struct Category {
    /// Primary key.
    pub id: i64,
    /// Display name.
    pub name: String,
}

/// A product row.
#[derive(
    Debug, Clone, PartialEq, CachedEntity, sqlx::FromRow, serde::Serialize, serde::Deserialize,
)]
#[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"], ttl = "10m")]
pub struct Product {
    /// Primary key.
    pub id: i64,
    /// The category it is listed in.
    pub category_id: i64,
    /// Display name.
    pub name: String,
    /// Price in cents.
    pub price_cents: i64,
}

/// A user, keyed by a text handle and scoped by tenant: exercises text, bool and nullable placeholders.
#[derive(
    Debug, Clone, PartialEq, CachedEntity, sqlx::FromRow, serde::Serialize, serde::Deserialize,
)]
#[cached_entity(
    table = "app_users",
    key = "tenant:<tenant>:user:<handle>",
    depends = ["team:<team_id>:members", "admins:<is_admin>"],
    ttl = "1h30m"
)]
pub struct User {
    /// Tenant scope.
    pub tenant: String,
    /// The user's handle, unique per tenant.
    pub handle: String,
    /// The team, if any.
    #[sqlx(rename = "team")]
    pub team_id: Option<i32>,
    /// Whether the user is an administrator.
    pub is_admin: bool,
}

/// The price of [`Product`] `id` read through `cache`, loaded from `db` on a miss (the row must exist).
///
/// # Panics
///
/// When the row is missing or the database fails.
pub async fn cached_price(cache: &cache_runtime::Cache, db: &sqlx::PgPool, id: i64) -> i64 {
    cache
        .get_or_load(cache_runtime::key!("product:<id>", id), || async {
            sqlx::query_scalar::<_, i64>("SELECT price_cents FROM products WHERE id = $1")
                .bind(id)
                .fetch_one(db)
                .await
        })
        .await
        .unwrap_or_else(|e| panic!("reading product {id}: {e}"))
}

/// A fresh database holding the `products` table with `rows` products (category 1, price 100 each), and a
/// plain pool on it.
///
/// # Panics
///
/// When the server is unreachable or the statement fails.
pub async fn products_database(hint: &str, rows: i64) -> (crate::TestDb, sqlx::PgPool) {
    let db = crate::TestDb::create(hint).await;
    let admin = db.pool().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
           price_cents bigint NOT NULL);
         INSERT INTO products SELECT i, 1, 'p' || i, 100 FROM generate_series(1, {rows}) i;"
    )))
    .execute(&admin)
    .await
    .unwrap_or_else(|e| panic!("creating the products table: {e}"));
    (db, admin)
}
