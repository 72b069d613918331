//! A small shop, end to end: categories, products, a cached product page that joins its category, a cached
//! list per category; writes through the pool (autocommit), a transaction, a rolled-back transaction, and a
//! plain `PgPool` standing for another service (the relay delivers those). After every write it prints what
//! was invalidated and checks that the next read is fresh.
//!
//! Creates a database of its own on `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! uses the Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`) under a key prefix of its own, and drops
//! both at the end.
//!
//! Run: `cargo run -p examples --bin shop`. Exits with status 1 if a read was ever stale, 2 if a server is
//! not reachable.

use std::time::{Duration, Instant};

use cache_runtime::{
    CachedEntity, CachedPgPool, CachedPool, LoadOptions, RedisStore, Registry, key,
};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};

/// A category row. A change invalidates `category:<id>` and the category's product list.
#[derive(Debug, Clone, PartialEq, CachedEntity, sqlx::FromRow, Serialize, Deserialize)]
#[cached_entity(table = "categories", key = "category:<id>", depends = ["category:<id>:products"])]
struct Category {
    id: i64,
    name: String,
}

/// A product row. A change invalidates `product:<id>`, its page, and the list of its category (of the old
/// and of the new category when it moves).
#[derive(Debug, Clone, PartialEq, CachedEntity, sqlx::FromRow, Serialize, Deserialize)]
#[cached_entity(
    table = "products",
    key = "product:<id>",
    depends = ["product:<id>:page", "category:<category_id>:products"],
    ttl = "10m"
)]
struct Product {
    id: i64,
    category_id: i64,
    name: String,
    price_cents: i64,
}

/// The product page: a product joined with its category.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, Deserialize)]
struct Page {
    id: i64,
    name: String,
    price_cents: i64,
    category_id: i64,
    category: String,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything the steps need.
struct Shop {
    pool: CachedPool,
    /// A plain pool: "another service" writing to the same database without this library.
    other_service: PgPool,
    redis: redis::aio::MultiplexedConnection,
    prefix: String,
    stale: usize,
}

/// The keys this example caches, watched before and after each write.
const WATCHED: [&str; 6] = [
    "product:1",
    "product:1:page",
    "product:3:page",
    "category:1:products",
    "category:2:products",
    "category:1",
];

#[tokio::main]
async fn main() {
    match run().await {
        Ok(0) => println!("\nevery read after every write was fresh."),
        Ok(stale) => {
            eprintln!("\n{stale} stale read(s): this is a bug, please report it");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

async fn run() -> Result<usize, BoxError> {
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let mut admin = PgConnection::connect(&admin_url).await.map_err(|e| {
        format!(
            "PostgreSQL is not reachable at {admin_url} ({e}).\n  Start a local server (e.g. `pg_ctlcluster <version> main \
             start`, or `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`)\n  or set \
             DATABASE_URL to a server where the user may CREATE DATABASE."
        )
    })?;
    let redis = redis_connection(&redis_url).await.map_err(|e| {
        format!(
            "Redis is not reachable at {redis_url} ({e}).\n  Start a local server (e.g. `redis-server --daemonize \
             yes`, or `docker run -d -p 6379:6379 redis:7`)\n  or set REDIS_URL."
        )
    })?;
    let name = format!("shop_example_{}", std::process::id());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    println!("created database {name}");
    let prefix = format!("{name}:");
    let result = shop(
        &examples::database_url(&admin_url, &name),
        &redis_url,
        redis,
        &prefix,
    )
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    println!("dropped database {name}");
    result
}

async fn redis_connection(url: &str) -> Result<redis::aio::MultiplexedConnection, BoxError> {
    let client = redis::Client::open(url)?;
    let mut con = tokio::time::timeout(
        Duration::from_secs(3),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "connection timed out")??;
    redis::cmd("PING").query_async::<()>(&mut con).await?;
    Ok(con)
}

async fn shop(
    url: &str,
    redis_url: &str,
    redis: redis::aio::MultiplexedConnection,
    prefix: &str,
) -> Result<usize, BoxError> {
    let other_service = PgPoolOptions::new().max_connections(2).connect(url).await?;
    sqlx::raw_sql(
        "CREATE TABLE categories (id bigint PRIMARY KEY, name text NOT NULL);
         CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL REFERENCES categories,
                                name text NOT NULL, price_cents bigint NOT NULL);
         INSERT INTO categories VALUES (1, 'Lamps'), (2, 'Kitchen');
         INSERT INTO products VALUES (1, 1, 'Desk lamp', 4999), (2, 1, 'Floor lamp', 8999),
                                     (3, 2, 'Kettle', 2999);",
    )
    .execute(&other_service)
    .await?;
    // The pool: connects, installs the outbox and the capture triggers for both tables, starts the relay.
    let store = RedisStore::connect(redis_url, prefix.to_owned()).await?;
    let pool = CachedPgPool::options()
        .registry(Registry::new([Category::META, Product::META]))
        .install_schema(true)
        .connect(url, store)
        .await?;
    println!("installed capture triggers on categories, products; Redis key prefix {prefix:?}\n");
    let mut shop = Shop {
        pool,
        other_service,
        redis,
        prefix: prefix.to_owned(),
        stale: 0,
    };
    let result = steps(&mut shop).await;
    shop.pool.close().await;
    shop.other_service.close().await;
    cleanup(&mut shop).await?;
    result.map(|()| shop.stale)
}

async fn steps(shop: &mut Shop) -> Result<(), BoxError> {
    println!("step 1: first reads load from PostgreSQL and fill the cache");
    shop.read_all().await?;
    println!("  second reads (the pages are stored now that their tags exist):");
    shop.read_all().await?;
    println!("  cached now: {}", shop.cached().await?.join(", "));

    shop.write(
        "step 2: autocommit UPDATE through the pool (price of product 1)",
        async |s: &mut Shop| {
            sqlx::query("UPDATE products SET price_cents = 3999 WHERE id = 1")
                .execute(&s.pool)
                .await?;
            Ok(())
        },
    )
    .await?;

    shop.write(
        "step 3: a transaction through the pool (product 2 moves from Lamps to Kitchen, is renamed)",
        async |s: &mut Shop| {
            let mut tx = s.pool.begin().await?;
            sqlx::query("UPDATE products SET category_id = 2 WHERE id = 2")
                .execute(&mut tx)
                .await?;
            sqlx::query("UPDATE products SET name = 'Kitchen lamp' WHERE id = 2")
                .execute(&mut tx)
                .await?;
            tx.commit().await?;
            Ok(())
        },
    )
    .await?;

    shop.write(
        "step 4: a rolled-back transaction (invalidates nothing)",
        async |s: &mut Shop| {
            let mut tx = s.pool.begin().await?;
            sqlx::query("UPDATE products SET price_cents = 1 WHERE id = 1")
                .execute(&mut tx)
                .await?;
            tx.rollback().await?;
            Ok(())
        },
    )
    .await?;

    shop.write(
        "step 5: category 1 renamed through the pool (the page of product 1 joins it)",
        async |s: &mut Shop| {
            sqlx::query("UPDATE categories SET name = 'Lighting' WHERE id = 1")
                .execute(&s.pool)
                .await?;
            Ok(())
        },
    )
    .await?;

    shop.write(
        "step 6: another service writes with a plain PgPool (no wrapper; the relay delivers)",
        async |s: &mut Shop| {
            sqlx::query("UPDATE products SET price_cents = 2499 WHERE id = 3")
                .execute(&s.other_service)
                .await?;
            let committed = Instant::now();
            let key = format!("{}product:3:page", s.prefix);
            loop {
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut s.redis)
                    .await?;
                if !exists {
                    break;
                }
                if committed.elapsed() > Duration::from_secs(10) {
                    return Err("the relay did not deliver within 10 s".into());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            println!(
                "  the relay invalidated product:3:page {:.1} ms after the commit",
                committed.elapsed().as_secs_f64() * 1e3
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}

impl Shop {
    /// Runs a write, then prints which watched keys it invalidated and re-reads everything.
    async fn write(
        &mut self,
        title: &str,
        write: impl AsyncFnOnce(&mut Shop) -> Result<(), BoxError>,
    ) -> Result<(), BoxError> {
        println!("\n{title}");
        let before = self.cached().await?;
        let tags_before = self.cached_tags().await?;
        write(self).await?;
        let after = self.cached().await?;
        let gone: Vec<_> = before
            .iter()
            .filter(|k| !after.contains(k))
            .cloned()
            .collect();
        let tags_after = self.cached_tags().await?;
        let tags: Vec<_> = tags_before
            .iter()
            .zip(&tags_after)
            .filter(|(b, a)| b != a)
            .map(|(b, _)| b.0.clone())
            .collect();
        println!(
            "  invalidated: {}",
            if gone.is_empty() && tags.is_empty() {
                "nothing".to_owned()
            } else {
                let mut all = gone;
                all.extend(tags.into_iter().map(|t| format!("{t} (tag)")));
                all.join(", ")
            }
        );
        self.read_all().await
    }

    /// The watched keys present in Redis.
    async fn cached(&mut self) -> Result<Vec<String>, BoxError> {
        let mut out = Vec::new();
        for key in WATCHED {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("{}{key}", self.prefix))
                .query_async(&mut self.redis)
                .await?;
            if exists {
                out.push(key.to_owned());
            }
        }
        Ok(out)
    }

    /// The tag tokens of the rows the pages join (`category:1`, `category:2`): a page built before a token
    /// changed is invalid even though its value is still in Redis.
    async fn cached_tags(&mut self) -> Result<Vec<(String, Option<String>)>, BoxError> {
        let mut out = Vec::new();
        for key in ["category:1", "category:2"] {
            let token: Option<String> = redis::cmd("GET")
                .arg(format!("{}<tag>{key}", self.prefix))
                .query_async(&mut self.redis)
                .await?;
            out.push((key.to_owned(), token));
        }
        Ok(out)
    }

    /// Reads the watched values through the cache, says whether each was a hit or a load, and checks it
    /// against the database.
    async fn read_all(&mut self) -> Result<(), BoxError> {
        self.read_product(1).await?;
        self.read_page(1).await?;
        self.read_page(3).await?;
        self.read_list(1).await?;
        self.read_list(2).await?;
        Ok(())
    }

    fn report<T: PartialEq + std::fmt::Debug>(
        &mut self,
        key: &str,
        before: cache_runtime::Stats,
        got: &T,
        fresh: &T,
    ) {
        let now = self.pool.cache().stats();
        let how = if now.loads == before.loads {
            "cache hit"
        } else if now.fills > before.fills {
            "loaded, stored"
        } else {
            // A tag found by the loader had no token yet (first use, or just invalidated): the load cannot
            // prove that no invalidation of it raced with the load, so the value is returned, not stored.
            "loaded, not stored (new tag)"
        };
        let ok = if got == fresh {
            "fresh"
        } else {
            self.stale += 1;
            "STALE"
        };
        println!("  read {key:<20} {how:<28} {ok}: {got:?}");
    }

    async fn read_product(&mut self, id: i64) -> Result<(), BoxError> {
        let loads = self.pool.cache().stats();
        let pool = &self.pool;
        let load = || async move {
            sqlx::query_as::<_, Product>("SELECT * FROM products WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
        };
        let got = pool
            .cache()
            .get_entity(Product::cache_key_for(&id), load)
            .await
            .map_err(|e| e.to_string())?;
        let fresh = load().await?;
        self.report(&format!("product:{id}"), loads, &got, &fresh);
        Ok(())
    }

    async fn read_page(&mut self, id: i64) -> Result<(), BoxError> {
        let loads = self.pool.cache().stats();
        let pool = &self.pool;
        let load = || async move {
            sqlx::query_as::<_, Page>(
                "SELECT p.id, p.name, p.price_cents, p.category_id, c.name AS category
                 FROM products p JOIN categories c ON c.id = p.category_id WHERE p.id = $1",
            )
            .bind(id)
            .fetch_one(pool)
            .await
        };
        // Tagged: the page is invalid when its own key or the key of the category it joined is invalidated.
        let got: Page = pool
            .cache()
            .get_or_load_tagged(
                key!("product:<id>:page", id = id),
                LoadOptions::new(),
                || async {
                    let page = load().await?;
                    let tags = vec![key!("category:<id>", id = page.category_id)];
                    Ok::<_, sqlx::Error>((page, tags))
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        let fresh = load().await?;
        self.report(&format!("product:{id}:page"), loads, &got, &fresh);
        Ok(())
    }

    async fn read_list(&mut self, category_id: i64) -> Result<(), BoxError> {
        let loads = self.pool.cache().stats();
        let pool = &self.pool;
        let load = || async move {
            sqlx::query_as::<_, (i64, String, i64)>(
                "SELECT id, name, price_cents FROM products WHERE category_id = $1 ORDER BY id",
            )
            .bind(category_id)
            .fetch_all(pool)
            .await
        };
        let got = pool
            .cache()
            .get_or_load(
                key!("category:<category_id>:products", category_id = category_id),
                load,
            )
            .await
            .map_err(|e| e.to_string())?;
        let fresh = load().await?;
        self.report(
            &format!("category:{category_id}:products"),
            loads,
            &got,
            &fresh,
        );
        Ok(())
    }
}

/// Deletes the example's keys.
async fn cleanup(shop: &mut Shop) -> Result<(), BoxError> {
    let mut keys: Vec<String> = Vec::new();
    for key in WATCHED.iter().chain(&["product:3", "category:2"]) {
        keys.push(format!("{}{key}", shop.prefix));
        keys.push(format!("{}<tag>{key}", shop.prefix));
    }
    redis::cmd("DEL")
        .arg(&keys)
        .query_async::<()>(&mut shop.redis)
        .await?;
    Ok(())
}
