//! A small shop, end to end: categories, products, a cached product page that joins its category, a cached
//! list per category; writes through the pool (autocommit), a transaction, a rolled-back transaction, and a
//! plain sqlx pool standing for another service (the relay delivers those). After every write it prints
//! what was invalidated and checks that the next read is fresh.
//!
//! The database comes from `DATABASE_URL`: unset, a SQLite database in a temporary file (WAL), removed at
//! the end; `sqlite:…`, that SQLite database (it gets the tables `categories` and `products`, dropped at
//! the end); `postgres://…`, a database of its own created on that server (the user must be allowed to
//! `CREATE DATABASE`) and dropped at the end. The store comes from `REDIS_URL`: unset, the in-process
//! `MemoryStore`; set, the Redis at that URL under a key prefix of its own, cleaned up at the end. So with no
//! environment it needs no server at all. The shop logic is written once, generic over the backend.
//!
//! Run: `cargo run -p examples --bin shop`. Exits with status 1 if a read was ever stale, 2 if a server is
//! not reachable.

use std::str::FromStr as _;
use std::time::{Duration, Instant};

use cache_runtime::backend::Backend;
use cache_runtime::{
    CachedEntity, CachedPgPool, CachedPool, CachedSqlitePool, CachedTransaction, LoadOptions,
    MemoryStore, RedisStore, Registry, key,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Connection as _, PgConnection, Pool};

#[path = "../shop_model.rs"]
mod shop_model;
use shop_model::{Category, Page, Product, SCHEMA};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The keys this example caches, watched before and after each write.
const WATCHED: [&str; 6] = [
    "product:1",
    "product:1:page",
    "product:3:page",
    "category:1:products",
    "category:2:products",
    "category:1",
];

/// Which store to use: `REDIS_URL` unset → in process.
enum StoreChoice {
    Memory,
    Redis { url: String, prefix: String },
}

impl StoreChoice {
    fn describe(&self) -> String {
        match self {
            StoreChoice::Memory => "the in-process MemoryStore".to_owned(),
            StoreChoice::Redis { url, prefix } => format!("Redis at {url} (key prefix {prefix:?})"),
        }
    }

    /// Connects `options` with this store; installs the outbox and the capture triggers for both tables and
    /// starts the relay.
    async fn connect<DB: Backend>(
        &self,
        options: <DB::Connection as sqlx::Connection>::Options,
    ) -> Result<CachedPool<DB>, BoxError> {
        let pool = CachedPool::<DB>::options()
            .registry(Registry::new([Category::META, Product::META]))
            .auto_install(true);
        Ok(match self {
            StoreChoice::Memory => pool.connect_with(options, MemoryStore::default()).await?,
            StoreChoice::Redis { url, prefix } => {
                let store = tokio::time::timeout(
                    Duration::from_secs(3),
                    RedisStore::connect(url, prefix.clone()),
                )
                .await
                .map_err(|_| "connection timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map_err(|e| {
                    format!(
                        "Redis is not reachable at {url} ({e}).\n  Start a local server (e.g. \
                         `redis-server --daemonize yes`, or `docker run -d -p 6379:6379 redis:7`),\n  \
                         set REDIS_URL to a reachable server, or unset it to use the in-process store."
                    )
                })?;
                pool.connect_with(options, store).await?
            }
        })
    }
}

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

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

async fn run() -> Result<usize, BoxError> {
    let name = format!("shop_example_{}", std::process::id());
    let store = match env("REDIS_URL") {
        None => StoreChoice::Memory,
        Some(url) => StoreChoice::Redis {
            url,
            prefix: format!("{name}:"),
        },
    };
    match env("DATABASE_URL") {
        Some(url) if url.starts_with("sqlite:") => {
            let options = SqliteConnectOptions::from_str(&url)?.create_if_missing(true);
            println!("using SQLite at {url} + {}", store.describe());
            let result = run_sqlite(options.clone(), &store).await;
            // The tables are the example's; dropping them drops their triggers.
            let conn = SqlitePoolOptions::new().connect_with(options).await?;
            sqlx::raw_sql("DROP TABLE IF EXISTS products; DROP TABLE IF EXISTS categories;")
                .execute(&conn)
                .await?;
            conn.close().await;
            result
        }
        Some(url) => run_postgres(&url, &name, &store).await,
        None => {
            let path = std::env::temp_dir().join(format!("{name}.sqlite3"));
            let options = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal);
            println!(
                "using SQLite in a temporary file ({}, WAL) + {}\n  (set DATABASE_URL=postgres://… \
                 and REDIS_URL=redis://… for PostgreSQL + Redis)",
                path.display(),
                store.describe()
            );
            let result = run_sqlite(options, &store).await;
            for suffix in ["", "-wal", "-shm"] {
                let mut file = path.clone().into_os_string();
                file.push(suffix);
                let _ = std::fs::remove_file(file);
            }
            println!("removed {}", path.display());
            result
        }
    }
}

async fn run_sqlite(options: SqliteConnectOptions, store: &StoreChoice) -> Result<usize, BoxError> {
    let other_service = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options.clone())
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&other_service).await?;
    let pool: CachedSqlitePool = store.connect(options).await?;
    Shop::run(pool, other_service, "SQLite", "SqlitePool").await
}

async fn run_postgres(admin_url: &str, name: &str, store: &StoreChoice) -> Result<usize, BoxError> {
    let mut admin = PgConnection::connect(admin_url).await.map_err(|e| {
        format!(
            "PostgreSQL is not reachable at {admin_url} ({e}).\n  Start a local server (e.g. `pg_ctlcluster <version> main \
             start`, or `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`),\n  set \
             DATABASE_URL to a server where the user may CREATE DATABASE, or unset it to use SQLite."
        )
    })?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await?;
    println!(
        "using PostgreSQL (database {name} created on {admin_url}) + {}",
        store.describe()
    );
    let url = examples::database_url(admin_url, name);
    let result = async {
        let other_service = PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&other_service).await?;
        let pool: CachedPgPool = store.connect(url.parse()?).await?;
        Shop::run(pool, other_service, "PostgreSQL", "PgPool").await
    }
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    println!("dropped database {name}");
    result
}

/// Everything the steps need.
struct Shop<DB: Backend> {
    pool: CachedPool<DB>,
    /// A plain pool: "another service" writing to the same database without this library.
    other_service: Pool<DB>,
    /// `PostgreSQL` or `SQLite`.
    database: &'static str,
    /// `PgPool` or `SqlitePool`.
    plain_pool: &'static str,
    stale: usize,
}

/// One implementation for both backends: the bounds say what the shop needs from sqlx.
impl<DB> Shop<DB>
where
    DB: Backend,
    for<'c> &'c CachedPool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'c, 't> &'c mut CachedTransaction<'t, DB>: sqlx::Executor<'c, Database = DB>,
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
    Product: for<'r> sqlx::FromRow<'r, DB::Row>,
    Page: for<'r> sqlx::FromRow<'r, DB::Row>,
    (i64, String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    /// Runs the steps on `pool`, then removes the example's keys from the store and closes the pools.
    async fn run(
        pool: CachedPool<DB>,
        other_service: Pool<DB>,
        database: &'static str,
        plain_pool: &'static str,
    ) -> Result<usize, BoxError> {
        println!("installed capture triggers on categories, products\n");
        let mut shop = Shop {
            pool,
            other_service,
            database,
            plain_pool,
            stale: 0,
        };
        let result = shop.steps().await;
        shop.cleanup().await?;
        shop.pool.close().await;
        shop.other_service.close().await;
        result.map(|()| shop.stale)
    }

    async fn steps(&mut self) -> Result<(), BoxError> {
        println!(
            "step 1: first reads load from {} and fill the cache",
            self.database
        );
        self.read_all().await?;
        println!("  second reads (the pages are stored now that their tags exist):");
        self.read_all().await?;
        println!("  cached now: {}", self.cached().await?.join(", "));

        self.write(
            "step 2: autocommit UPDATE through the pool (price of product 1)",
            async |s: &mut Self| {
                sqlx::query("UPDATE products SET price_cents = 3999 WHERE id = 1")
                    .execute(&s.pool)
                    .await?;
                Ok(())
            },
        )
        .await?;

        self.write(
            "step 3: a transaction through the pool (product 2 moves from Lamps to Kitchen, is renamed)",
            async |s: &mut Self| {
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

        self.write(
            "step 4: a rolled-back transaction (invalidates nothing)",
            async |s: &mut Self| {
                let mut tx = s.pool.begin().await?;
                sqlx::query("UPDATE products SET price_cents = 1 WHERE id = 1")
                    .execute(&mut tx)
                    .await?;
                tx.rollback().await?;
                Ok(())
            },
        )
        .await?;

        self.write(
            "step 5: category 1 renamed through the pool (the page of product 1 joins it)",
            async |s: &mut Self| {
                sqlx::query("UPDATE categories SET name = 'Lighting' WHERE id = 1")
                    .execute(&s.pool)
                    .await?;
                Ok(())
            },
        )
        .await?;

        let title = format!(
            "step 6: another service writes with a plain {} (no wrapper; the relay delivers{})",
            self.plain_pool,
            if self.database == "SQLite" {
                " on its next sweep: SQLite has no NOTIFY"
            } else {
                ""
            }
        );
        self.write(&title, async |s: &mut Self| {
            sqlx::query("UPDATE products SET price_cents = 2499 WHERE id = 3")
                .execute(&s.other_service)
                .await?;
            let committed = Instant::now();
            while s.is_cached("product:3:page").await? {
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
        })
        .await?;
        Ok(())
    }

    /// Runs a write, then prints which watched keys it invalidated and re-reads everything.
    async fn write(
        &mut self,
        title: &str,
        write: impl AsyncFnOnce(&mut Self) -> Result<(), BoxError>,
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

    /// Whether the store holds a value for `key` (asked through the `Store` trait, so the same code watches
    /// Redis and the in-process store).
    async fn is_cached(&self, key: &str) -> Result<bool, BoxError> {
        Ok(self.pool.store().peek(key, &[]).await?.value.is_some())
    }

    /// The watched keys present in the store.
    async fn cached(&self) -> Result<Vec<String>, BoxError> {
        let mut out = Vec::new();
        for key in WATCHED {
            if self.is_cached(key).await? {
                out.push(key.to_owned());
            }
        }
        Ok(out)
    }

    /// The tag tokens of the rows the pages join (`category:1`, `category:2`): a page built before a token
    /// changed is invalid even though its value is still in the store.
    async fn cached_tags(&self) -> Result<Vec<(String, Option<String>)>, BoxError> {
        let keys = ["category:1".to_owned(), "category:2".to_owned()];
        let tokens = self.pool.store().tags(&keys, None).await?;
        Ok(keys
            .into_iter()
            .zip(tokens)
            .map(|(k, t)| (k, t.map(|t| t.id)))
            .collect())
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
        before: cache_runtime::cache::Stats,
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
        println!("  read {key:<20} {how:<28} {ok}: {got:?} (database: {fresh:?})");
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

    /// Removes the example's keys (values, tag tokens, namespace tokens) from the store.
    async fn cleanup(&self) -> Result<(), BoxError> {
        let keys: Vec<String> = WATCHED
            .iter()
            .chain(&["product:3", "category:2"])
            // The namespace tag tokens of the four shapes (what a `TRUNCATE` would invalidate).
            .chain(&[
                "product:<>",
                "product:<>:page",
                "category:<>",
                "category:<>:products",
            ])
            .map(|k| (*k).to_owned())
            .collect();
        self.pool.store().invalidate(&keys).await?;
        Ok(())
    }
}
