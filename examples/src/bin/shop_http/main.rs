//! The shop as an HTTP service (axum): product pages, product lists per category and admin writes, cached
//! in Redis through `CachedPgPool`, with a live page of the cache's counters.
//!
//! Reads are cache-aside with leases: `GET /products/{id}` (`pool.get::<Product>`, a missing product is a
//! cached tombstone), `GET /products/{id}/page` (the product joined with its category, tagged with the
//! category) and `GET /categories/{id}/products`. Writes are plain sqlx queries on `&CachedPgPool`, whose
//! keys are invalidated before the response is sent, so the next read sees them: `POST /admin/products`
//! (JSON `{"id"?, "category_id", "name", "price_cents"}`), `PUT /admin/products/{id}` (any of
//! `category_id`, `name`, `price_cents`), `DELETE /admin/products/{id}`, `PUT /admin/categories/{id}`
//! (`{"name"}`). A write by anything else (`psql`, another service) is delivered by the relay within
//! milliseconds. Every response to a write carries its read-your-writes token (`x-cache-token` header,
//! `cache_token` cookie; `cache_runtime::layer::TokenLayer`): requests that send it back never read an
//! older value, on any instance of the service, even before the write's invalidation reached Redis.
//! `GET /stats` is the cache's counters as JSON; `GET /` a page showing hits, misses and
//! invalidations live.
//!
//! Configuration, from the environment:
//! - `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`): the server where the service
//!   creates its own database `shop_http_<pid>` (the user must be allowed to `CREATE DATABASE`), seeded
//!   with the shop's categories and products, and dropped on shutdown.
//! - `REDIS_URL` (default `redis://127.0.0.1:6379`): the Redis used under the key prefix `shop_http_<pid>:`,
//!   whose keys are deleted on shutdown.
//! - `ADDR` (default `127.0.0.1:3000`; port `0` picks a free one): where to listen. The first line on
//!   standard output is `listening on http://<address>`, once the service is ready.
//! - `SHOP_HTTP_SECONDS` (optional): shut down after that many seconds.
//!
//! It shuts down gracefully on Ctrl-C, `SIGTERM` or the end of `SHOP_HTTP_SECONDS`.
//!
//! Run: `cargo run -p examples --bin shop_http`, open <http://127.0.0.1:3000/>, then for example
//! `curl 127.0.0.1:3000/products/1` (twice: the second is a hit) and
//! `curl -X PUT -H 'content-type: application/json' -d '{"price_cents": 3999}' 127.0.0.1:3000/admin/products/1`.

mod app;
mod counters;
mod error;
#[path = "../../shop_model.rs"]
mod shop_model;

use std::time::Duration;

use cache_runtime::{CachedEntity as _, CachedPgPool, RedisStore, Registry};
use examples::database_url;
use sqlx::{Connection as _, PgConnection};

use crate::app::AppState;
use crate::counters::Counters;
use crate::shop_model::{Category, Product, SCHEMA};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The service's configuration.
struct Config {
    admin_url: String,
    redis_url: String,
    addr: String,
    seconds: Option<u64>,
}

impl Config {
    fn from_env() -> Result<Self, BoxError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let seconds = var("SHOP_HTTP_SECONDS")
            .map(|s| {
                s.parse()
                    .map_err(|e| format!("SHOP_HTTP_SECONDS={s:?} is not a number of seconds: {e}"))
            })
            .transpose()?;
        Ok(Self {
            admin_url: var("DATABASE_URL")
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
            redis_url: var("REDIS_URL").unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned()),
            addr: var("ADDR").unwrap_or_else(|| "127.0.0.1:3000".to_owned()),
            seconds,
        })
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("shop_http: {e}");
        std::process::exit(1);
    }
}

/// Creates the database, serves until shutdown, then drops the database (also when serving failed).
async fn run() -> Result<(), BoxError> {
    let config = Config::from_env()?;
    let counters = Counters::default();
    counters.install()?;
    let name = format!("shop_http_{}", std::process::id());
    let mut admin = PgConnection::connect(&config.admin_url)
        .await
        .map_err(|e| {
            format!(
                "PostgreSQL is not reachable at {} ({e}); set DATABASE_URL to a server where the user \
                 may CREATE DATABASE",
                config.admin_url
            )
        })?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    eprintln!("shop_http: created database {name}");
    let result = serve(&config, &name, counters).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    eprintln!("shop_http: dropped database {name}");
    result
}

/// Seeds the database, connects the cached pool, serves until shutdown, and removes the service's keys
/// from Redis.
async fn serve(config: &Config, name: &str, counters: Counters) -> Result<(), BoxError> {
    let url = database_url(&config.admin_url, name);
    let seed = sqlx::PgPool::connect(&url).await?;
    sqlx::raw_sql(SCHEMA).execute(&seed).await?;
    // Ids for products created without one (the seeded rows have ids 1 to 3).
    sqlx::raw_sql(
        "ALTER TABLE products ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (START WITH 100)",
    )
    .execute(&seed)
    .await?;
    seed.close().await;

    let prefix = format!("{name}:");
    let store = tokio::time::timeout(
        Duration::from_secs(3),
        RedisStore::connect(&config.redis_url, prefix.clone()),
    )
    .await
    .map_err(|_| "connection timed out".to_owned())
    .and_then(|r| r.map_err(|e| e.to_string()))
    .map_err(|e| {
        format!(
            "Redis is not reachable at {} ({e}); set REDIS_URL to a reachable server",
            config.redis_url
        )
    })?;
    let pool = CachedPgPool::options()
        .registry(Registry::new([Category::META, Product::META]))
        .auto_install(true)
        .connect(&url, store)
        .await?;

    let result = async {
        let listener = tokio::net::TcpListener::bind(&config.addr)
            .await
            .map_err(|e| format!("cannot listen on {} ({e}); set ADDR", config.addr))?;
        println!("listening on http://{}", listener.local_addr()?);
        let state = AppState {
            pool: pool.clone(),
            counters,
        };
        axum::serve(listener, app::router(state))
            .with_graceful_shutdown(shutdown(config.seconds))
            .await?;
        Ok::<_, BoxError>(())
    }
    .await;
    pool.close().await;
    examples::delete_prefix(&config.redis_url, &prefix).await?;
    eprintln!("shop_http: deleted the Redis keys under {prefix:?}");
    result
}

/// Completes on Ctrl-C, `SIGTERM`, or after `seconds`.
async fn shutdown(seconds: Option<u64>) {
    let deadline = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    let terminate = async {
        #[cfg(unix)]
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    };
    let why = tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        () = terminate => "SIGTERM",
        () = deadline => "SHOP_HTTP_SECONDS elapsed",
    };
    eprintln!("shop_http: shutting down ({why})");
}
