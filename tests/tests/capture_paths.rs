//! Every way PostgreSQL can write a registered row, tried as a deployment would: writes addressed to a
//! partition or an inheritance child, writes in `session_replication_role = replica` (what `pg_restore` and
//! logical-replication apply use), and the DDL that silently removes capture (`DISABLE TRIGGER`, a table
//! dropped and created again, a partition attached after the install), which a pool must refuse at
//! connect. Each write test asserts the next read through the cache returns the database's value: at once
//! for writes through the pool, within the relay bound for other clients.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::time::{Duration, Instant};

use cache_runtime::backend::postgres::PgSchema;
use cache_runtime::{CachedEntity, CachedPgPool, Error, MemoryStore, Registry, key};
use sqlx::PgPool;
use tests::TestDb;
use tests::model::Product;

/// How long a write of another client may take to reach the cache (relay `NOTIFY`, with slack for a
/// loaded two-core machine).
const RELAY_BOUND: Duration = Duration::from_secs(3);

fn registry() -> Registry {
    Registry::new([Product::META])
}

/// `products` partitioned by id (partitions `products_low` and `products_high`), seeded.
const PARTITIONED: &str = "
CREATE TABLE products (id bigint, category_id bigint NOT NULL, name text NOT NULL, price_cents bigint NOT NULL)
  PARTITION BY RANGE (id);
CREATE TABLE products_low PARTITION OF products FOR VALUES FROM (0) TO (100);
CREATE TABLE products_high PARTITION OF products FOR VALUES FROM (100) TO (200);
INSERT INTO products VALUES (1, 1, 'lamp', 100), (150, 2, 'chair', 200);
";

/// `products` with an inheritance child `products_archive`, seeded in both.
const INHERITED: &str = "
CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
  price_cents bigint NOT NULL);
CREATE TABLE products_archive (archived_at timestamptz) INHERITS (products);
INSERT INTO products VALUES (1, 1, 'lamp', 100);
INSERT INTO products_archive (id, category_id, name, price_cents) VALUES (150, 2, 'chair', 200);
";

struct Shop {
    _db: TestDb,
    admin: PgPool,
    pool: CachedPgPool,
}

impl Shop {
    /// A database with `tables`, capture installed by a pool (relay running, in-process store).
    async fn new(hint: &str, tables: &str) -> Self {
        let db = TestDb::create(hint).await;
        let admin = db.pool().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(tables.to_owned()))
            .execute(&admin)
            .await
            .unwrap();
        let pool = CachedPgPool::options()
            .registry(registry())
            .auto_install(true)
            .connect(&db.url, MemoryStore::default())
            .await
            .unwrap();
        Self {
            _db: db,
            admin,
            pool,
        }
    }

    /// The price of product `id`, read through the cache (loaded from the database on a miss).
    async fn cached_price(&self, id: i64) -> Option<i64> {
        let pool = self.pool.sqlx_pool();
        self.pool
            .cache()
            .get_or_load(key!("product:<id>", id), || async {
                sqlx::query_scalar("SELECT price_cents FROM products WHERE id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await
            })
            .await
            .unwrap()
    }

    /// The price in the database.
    async fn price(&self, id: i64) -> Option<i64> {
        sqlx::query_scalar("SELECT price_cents FROM products WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.admin)
            .await
            .unwrap()
    }

    /// Caches products `ids` and checks the cache then serves them (a write to the database alone would
    /// not show).
    async fn warm(&self, ids: &[i64]) {
        for &id in ids {
            let price = self.cached_price(id).await;
            assert_eq!(price, self.price(id).await);
            let hits = self.pool.cache().stats().hits;
            assert_eq!(self.cached_price(id).await, price);
            assert_eq!(
                self.pool.cache().stats().hits,
                hits + 1,
                "product {id} is cached"
            );
        }
    }

    /// Asserts that a read through the cache returns the database's value now.
    async fn fresh_now(&self, id: i64, what: &str) {
        assert_eq!(
            self.cached_price(id).await,
            self.price(id).await,
            "{what}: the write through the pool was not invalidated before it returned"
        );
    }

    /// Asserts that a read through the cache returns the database's value within the relay bound.
    async fn fresh_within_bound(&self, id: i64, what: &str) {
        let start = Instant::now();
        loop {
            let (cached, stored) = (self.cached_price(id).await, self.price(id).await);
            if cached == stored {
                return;
            }
            assert!(
                start.elapsed() < RELAY_BOUND,
                "{what}: product {id} still reads {cached:?} from the cache, the database has {stored:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Turns the event triggers off, as on a server where the installing role is not a superuser: DDL
    /// that breaks capture then goes through, and only the connect check notices.
    async fn without_event_triggers(&self) {
        sqlx::raw_sql(
            "ALTER EVENT TRIGGER cache_invalidation_ddl DISABLE;
             ALTER EVENT TRIGGER cache_invalidation_rewrite DISABLE;
             ALTER EVENT TRIGGER cache_invalidation_drop DISABLE;",
        )
        .execute(&self.admin)
        .await
        .unwrap();
    }

    /// Asserts that a new pool is refused with a capture problem containing `needle`; returns the error.
    async fn refused(&self, needle: &str) -> Error {
        match self.connect_again().await {
            Err(Error::CaptureBroken(problems)) => {
                assert!(
                    problems.iter().any(|p| p.contains(needle)),
                    "{needle}: {problems:?}"
                );
                Error::CaptureBroken(problems)
            }
            other => panic!("expected CaptureBroken ({needle}), got {other:?}"),
        }
    }

    /// What connecting a new pool to this database says.
    async fn connect_again(&self) -> Result<CachedPgPool, Error> {
        let options = self.pool.sqlx_pool().connect_options();
        CachedPgPool::options()
            .registry(registry())
            .run_relay(false)
            .connect_with((*options).clone(), MemoryStore::default())
            .await
    }
}

#[tokio::test]
async fn writes_addressed_to_a_partition_are_captured() {
    let shop = Shop::new("partition", PARTITIONED).await;
    shop.warm(&[1, 150]).await;
    sqlx::query("UPDATE products_low SET price_cents = 101 WHERE id = 1")
        .execute(&shop.pool)
        .await
        .unwrap();
    shop.fresh_now(1, "UPDATE of a partition through the pool")
        .await;
    sqlx::query("UPDATE products_high SET price_cents = 201 WHERE id = 150")
        .execute(&shop.admin)
        .await
        .unwrap();
    shop.fresh_within_bound(150, "UPDATE of a partition by another client")
        .await;
    shop.warm(&[150]).await;
    sqlx::query("DELETE FROM products_high WHERE id = 150")
        .execute(&shop.admin)
        .await
        .unwrap();
    shop.fresh_within_bound(150, "DELETE from a partition by another client")
        .await;
    shop.warm(&[1]).await;
    sqlx::query("TRUNCATE products_low")
        .execute(&shop.admin)
        .await
        .unwrap();
    shop.fresh_within_bound(1, "TRUNCATE of a partition").await;
}

#[tokio::test]
async fn a_partition_attached_after_the_install_is_refused_until_capture_is_reinstalled() {
    let shop = Shop::new("late_partition", PARTITIONED).await;
    shop.without_event_triggers().await;
    sqlx::raw_sql(
        "CREATE TABLE products_more PARTITION OF products FOR VALUES FROM (200) TO (300);
         INSERT INTO products VALUES (250, 3, 'desk', 300);",
    )
    .execute(&shop.admin)
    .await
    .unwrap();
    shop.refused("products_more has no trigger cache_invalidation_")
        .await;
    shop.pool.install_schema().await.unwrap();
    shop.connect_again().await.unwrap();
    shop.warm(&[250]).await;
    sqlx::query("UPDATE products_more SET price_cents = 301 WHERE id = 250")
        .execute(&shop.admin)
        .await
        .unwrap();
    shop.fresh_within_bound(250, "UPDATE of the new partition")
        .await;
}

#[tokio::test]
async fn writes_to_an_inheritance_child_are_captured() {
    let shop = Shop::new("inherit", INHERITED).await;
    shop.warm(&[1, 150]).await;
    sqlx::query("UPDATE products_archive SET price_cents = 201 WHERE id = 150")
        .execute(&shop.pool)
        .await
        .unwrap();
    shop.fresh_now(150, "UPDATE of an inheritance child through the pool")
        .await;
    shop.warm(&[150]).await;
    sqlx::query("DELETE FROM products_archive WHERE id = 150")
        .execute(&shop.admin)
        .await
        .unwrap();
    shop.fresh_within_bound(150, "DELETE from an inheritance child by another client")
        .await;
    // Through the parent, the child's rows are captured by the parent's trigger.
    sqlx::query(
        "INSERT INTO products_archive (id, category_id, name, price_cents) VALUES (151, 2, 'x', 1)",
    )
    .execute(&shop.pool)
    .await
    .unwrap();
    shop.warm(&[1, 151]).await;
    sqlx::query("UPDATE products SET price_cents = price_cents + 1")
        .execute(&shop.pool)
        .await
        .unwrap();
    shop.fresh_now(1, "UPDATE of the parent").await;
    shop.fresh_now(151, "UPDATE of the parent, row in the child")
        .await;
}

#[tokio::test]
async fn writes_in_replica_mode_are_captured() {
    let shop = Shop::new("replica_role", INHERITED).await;
    shop.warm(&[1]).await;
    let mut conn = shop.admin.acquire().await.unwrap();
    sqlx::raw_sql(
        "SET session_replication_role = replica;
         UPDATE products SET price_cents = 111 WHERE id = 1;
         RESET session_replication_role;",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    shop.fresh_within_bound(1, "UPDATE with session_replication_role = replica")
        .await;
    // Through the pool too (a migration tool run on the application's pool).
    shop.warm(&[1]).await;
    let mut tx = shop.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut tx)
        .await
        .unwrap();
    sqlx::query("UPDATE products SET price_cents = 112 WHERE id = 1")
        .execute(&mut tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    shop.fresh_now(1, "a replica-mode transaction through the pool")
        .await;
}

#[tokio::test]
async fn disabled_triggers_are_refused_at_connect() {
    let shop = Shop::new("disabled", PARTITIONED).await;
    shop.without_event_triggers().await;
    sqlx::query("ALTER TABLE products_low DISABLE TRIGGER ALL")
        .execute(&shop.admin)
        .await
        .unwrap();
    let message = shop
        .refused("on products_low is disabled")
        .await
        .to_string();
    assert!(message.contains("install_schema()"), "{message}");
    // `ENABLE` (not `ENABLE ALWAYS`) would stop capture in replica mode: refused too.
    sqlx::query("ALTER TABLE products_low ENABLE TRIGGER ALL")
        .execute(&shop.admin)
        .await
        .unwrap();
    shop.refused("not ENABLE ALWAYS").await;
    shop.pool.install_schema().await.unwrap();
    shop.connect_again().await.unwrap();
}

#[tokio::test]
async fn a_table_dropped_and_created_again_is_refused_at_connect() {
    let shop = Shop::new("recreated", INHERITED).await;
    shop.without_event_triggers().await;
    sqlx::raw_sql(
        "DROP TABLE products CASCADE;
         CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
           price_cents bigint NOT NULL);",
    )
    .execute(&shop.admin)
    .await
    .unwrap();
    shop.refused("products has no trigger cache_invalidation_update")
        .await;
    // A rebuilt table swapped in with RENAME is the same case.
    shop.pool.install_schema().await.unwrap();
    shop.without_event_triggers().await;
    sqlx::raw_sql(
        "CREATE TABLE products_new (LIKE products INCLUDING ALL);
         ALTER TABLE products RENAME TO products_old;
         ALTER TABLE products_new RENAME TO products;",
    )
    .execute(&shop.admin)
    .await
    .unwrap();
    assert!(
        matches!(shop.connect_again().await, Err(Error::CaptureBroken(_))),
        "a swapped-in table without triggers"
    );
}

#[tokio::test]
async fn a_role_without_the_outbox_grants_is_refused_at_connect() {
    let shop = Shop::new("grants", INHERITED).await;
    let role = format!("app_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
         GRANT SELECT, INSERT, UPDATE, DELETE ON products TO {role};"
    )))
    .execute(&shop.admin)
    .await
    .unwrap();
    let options = (*shop.pool.sqlx_pool().connect_options())
        .clone()
        .username(&role);
    let connect = || {
        CachedPgPool::options()
            .registry(registry())
            .run_relay(false)
            .connect_with(options.clone(), MemoryStore::default())
    };
    let result = connect().await;
    let grant = PgSchema::grant_sql(&role);
    match &result {
        Err(Error::MissingGrants {
            role: r,
            missing,
            grant: g,
        }) => {
            assert_eq!(r, &role);
            assert!(
                missing.contains(&"EXECUTE on cache_invalidation.transaction_keys()".to_owned()),
                "{missing:?}"
            );
            assert_eq!(g, &grant);
            assert!(result.as_ref().unwrap_err().to_string().contains(&grant));
        }
        other => panic!("expected MissingGrants, got {other:?}"),
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(grant))
        .execute(&shop.admin)
        .await
        .unwrap();
    let pool = connect().await.unwrap();
    sqlx::query("UPDATE products SET price_cents = 5 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {role}; DROP ROLE {role};"
    )))
    .execute(&shop.admin)
    .await
    .unwrap();
}

/// A placeholder on a case-insensitive column (`citext`, or a non-deterministic collation) is refused at
/// install: a key rendered from one spelling would miss readers using another.
#[tokio::test]
async fn case_insensitive_placeholder_columns_are_refused_at_install() {
    use cache_runtime::error::Problem;

    #[derive(CachedEntity)]
    #[cached_entity(table = "handles", key = "handle:<name>")]
    #[allow(dead_code)] // only its metadata is used
    struct Handle {
        name: String,
    }

    for (hint, column) in [
        ("citext", "name citext"),
        ("nondeterministic", "name text COLLATE case_insensitive"),
    ] {
        let db = TestDb::create(hint).await;
        let admin = db.pool().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE EXTENSION citext;
             CREATE COLLATION case_insensitive (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
             CREATE TABLE handles ({column});"
        )))
        .execute(&admin)
        .await
        .unwrap_or_else(|e| panic!("{hint}: needs the citext extension and ICU collations: {e}"));
        let registry = Registry::new([Handle::META]);
        let mut conn = admin.acquire().await.unwrap();
        match PgSchema::new(&registry).install(&mut conn).await {
            Err(Error::Columns(problems)) => {
                assert!(
                    matches!(&problems[0].problem, Problem::CaseInsensitive { .. }),
                    "{hint}: {problems:?}"
                );
                let message = problems[0].to_string();
                assert!(message.contains("case-insensitively"), "{message}");
            }
            other => panic!("{hint}: expected a column problem, got {other:?}"),
        }
        // The exported script refuses it too (a migration applied by hand).
        let sql = PgSchema::new(&registry).sql();
        let error = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .expect_err("the script refuses the column");
        assert!(
            error.to_string().contains("case-insensitive"),
            "{hint}: {error}"
        );
    }
}

/// A write made by a `DEFERRABLE INITIALLY DEFERRED` constraint trigger runs during `COMMIT`: the keys a
/// `CachedTransaction` reads before its `COMMIT` include it.
#[tokio::test]
async fn writes_of_deferred_constraint_triggers_are_delivered_by_the_commit() {
    let shop = Shop::new("deferred", INHERITED).await;
    sqlx::raw_sql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, product_id bigint NOT NULL);
         CREATE FUNCTION count_order() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           UPDATE products SET price_cents = price_cents + 1 WHERE id = NEW.product_id;
           RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER count_order AFTER INSERT ON orders DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION count_order();",
    )
    .execute(&shop.admin)
    .await
    .unwrap();
    shop.warm(&[1]).await;
    let mut tx = shop.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES (1, 1)")
        .execute(&mut tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    shop.fresh_now(1, "a write of a deferred constraint trigger")
        .await;
    // A deferred check that fails still fails the commit, and nothing is published.
    sqlx::raw_sql(
        "CREATE TABLE limits (id bigint PRIMARY KEY, product_id bigint NOT NULL REFERENCES products (id)
           DEFERRABLE INITIALLY DEFERRED);",
    )
    .execute(&shop.admin)
    .await
    .unwrap();
    let mut tx = shop.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO limits VALUES (1, 999)")
        .execute(&mut tx)
        .await
        .unwrap();
    let error = tx
        .commit()
        .await
        .expect_err("the deferred foreign key fails");
    assert!(error.to_string().contains("foreign key"), "{error}");
}

/// The outermost commit reads the keys and sends `COMMIT` in one message, which leaves sqlx's transaction
/// an empty one of its own to roll back. On a pool of one connection: the write is committed (seen by
/// another session), the next statements on that connection run in transactions of their own (two
/// transaction ids), the connection is not left idle in a transaction, and a commit whose `COMMIT` fails delivers
/// nothing and leaves the connection usable.
#[tokio::test]
async fn a_commit_in_one_message_leaves_its_connection_out_of_any_transaction() {
    let shop = Shop::new("commit_message", INHERITED).await;
    let pool = CachedPgPool::options()
        .registry(registry())
        .pool_options(sqlx::postgres::PgPoolOptions::new().max_connections(1))
        .connect(&shop._db.url, MemoryStore::default())
        .await
        .unwrap();
    for round in 0..3_i64 {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("UPDATE products SET price_cents = $1 WHERE id = 1")
            .bind(1_000 + round)
            .execute(&mut tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            shop.price(1).await,
            Some(1_000 + round),
            "round {round}: committed"
        );
        let xact = || async {
            sqlx::query_scalar::<_, String>("SELECT pg_current_xact_id()::text")
                .fetch_one(pool.sqlx_pool())
                .await
                .unwrap()
        };
        let (first, second) = (xact().await, xact().await);
        assert_ne!(
            first, second,
            "round {round}: the next statements ran inside a transaction left open"
        );
    }
    let idle_in_transaction: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
           AND state LIKE 'idle in transaction%'",
    )
    .fetch_one(&shop.admin)
    .await
    .unwrap();
    assert_eq!(
        idle_in_transaction, 0,
        "a connection was left in a transaction"
    );
    // A `COMMIT` that fails (a deferred check): an error, nothing committed, the connection usable.
    sqlx::raw_sql(
        "CREATE TABLE holds (id bigint PRIMARY KEY, product_id bigint NOT NULL REFERENCES products (id)
           DEFERRABLE INITIALLY DEFERRED);",
    )
    .execute(&shop.admin)
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE products SET price_cents = 7 WHERE id = 1")
        .execute(&mut tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO holds VALUES (1, 999)")
        .execute(&mut tx)
        .await
        .unwrap();
    assert!(
        tx.commit().await.is_err(),
        "the deferred foreign key fails the commit"
    );
    assert_eq!(
        shop.price(1).await,
        Some(1_002),
        "the failed commit wrote nothing"
    );
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(pool.sqlx_pool())
        .await
        .unwrap();
    assert_eq!(one, 1);
    pool.close().await;
}

/// One statement changing `rows` rows through the pool, on Redis: the call returns with every key
/// invalidated (delivered in bounded chunks), the read gate open, the outbox drained.
async fn huge_update(rows: i64) {
    let db = TestDb::create("huge").await;
    let admin = db.pool().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
           price_cents bigint NOT NULL);
         INSERT INTO products SELECT i, i % 10, 'p' || i, 100 FROM generate_series(1, {rows}) AS i;"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let prefix = tests::TestPrefix::create("huge").await;
    let store = cache_runtime::RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .unwrap();
    let pool = CachedPgPool::options()
        .registry(registry())
        .auto_install(true)
        .connect(&db.url, store)
        .await
        .unwrap();
    let sample = [1, rows / 2, rows];
    for id in sample {
        let price: Option<i64> = pool
            .cache()
            .get_or_load(key!("product:<id>", id), || async {
                Ok::<_, std::io::Error>(Some(100))
            })
            .await
            .unwrap();
        assert_eq!(price, Some(100));
        assert!(prefix.exists(&format!("product:{id}")).await);
    }
    let start = Instant::now();
    sqlx::query("UPDATE products SET price_cents = price_cents + 1")
        .execute(&pool)
        .await
        .unwrap();
    let took = start.elapsed();
    let bytes: Option<i64> = sqlx::query_scalar(
        "SELECT sum(pg_column_size(keys))::bigint FROM cache_invalidation.outbox",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    eprintln!(
        "UPDATE of {rows} rows through the pool, {} keys: {took:?}; outbox: {} bytes",
        rows + 10,
        bytes.unwrap_or(0)
    );
    for id in sample {
        assert!(
            !prefix.exists(&format!("product:{id}")).await,
            "product:{id} still cached after the call returned"
        );
    }
    assert!(!pool.cache().gate_closed(), "the read gate stays open");
    let start = Instant::now();
    while pool.relay().backlog().await.unwrap().depth > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the outbox row is deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_statement_changing_100k_rows_is_delivered_when_it_returns() {
    huge_update(100_000).await;
}

#[tokio::test]
async fn a_statement_changing_1m_rows_is_delivered_when_it_returns() {
    huge_update(1_000_000).await;
}

/// An autocommit statement whose text the write classifier used to misread (the word before `UPDATE` is
/// `key`, as in `FOR NO KEY UPDATE`) is delivered before the call returns.
#[tokio::test]
async fn a_cte_ending_in_key_before_update_is_delivered_when_it_returns() {
    let shop = Shop::new("classifier", INHERITED).await;
    sqlx::raw_sql("CREATE TABLE settings (key text PRIMARY KEY, v bigint); INSERT INTO settings VALUES ('price', 7);")
        .execute(&shop.admin)
        .await
        .unwrap();
    shop.warm(&[1]).await;
    sqlx::query(
        "WITH s AS (SELECT v FROM settings WHERE key = $1) UPDATE products SET price_cents = s.v FROM s WHERE id = 1",
    )
    .bind("price")
    .execute(&shop.pool)
    .await
    .unwrap();
    shop.fresh_now(1, "a CTE whose last word before UPDATE is `key`")
        .await;
}

/// With the event triggers (installed by a superuser), DDL on a registered table while the application
/// runs is repaired or refused at once, and data it changes without DML is invalidated.
mod ddl_while_running {
    use super::*;

    #[tokio::test]
    async fn disabling_capture_is_refused() {
        let shop = Shop::new("ddl_disable", PARTITIONED).await;
        for sql in [
            "ALTER TABLE products_low DISABLE TRIGGER ALL",
            "ALTER TABLE products DISABLE TRIGGER cache_invalidation_replica",
        ] {
            let error = sqlx::query(sql).execute(&shop.admin).await.expect_err(sql);
            assert!(error.to_string().contains("is disabled"), "{sql}: {error}");
        }
        // `ENABLE` (not ALWAYS) is switched back to ALWAYS: the pool still connects.
        sqlx::query("ALTER TABLE products_low ENABLE TRIGGER ALL")
            .execute(&shop.admin)
            .await
            .unwrap();
        shop.connect_again().await.unwrap();
    }

    #[tokio::test]
    async fn a_partition_created_later_is_captured_at_once() {
        let shop = Shop::new("ddl_partition", PARTITIONED).await;
        sqlx::raw_sql(
            "CREATE TABLE products_more PARTITION OF products FOR VALUES FROM (200) TO (300);
             INSERT INTO products VALUES (250, 3, 'desk', 300);",
        )
        .execute(&shop.admin)
        .await
        .unwrap();
        shop.connect_again().await.unwrap();
        shop.warm(&[250]).await;
        sqlx::query("UPDATE products_more SET price_cents = 301 WHERE id = 250")
            .execute(&shop.pool)
            .await
            .unwrap();
        shop.fresh_now(250, "UPDATE of a partition created after the install")
            .await;
    }

    #[tokio::test]
    async fn a_table_dropped_and_created_again_is_captured_at_once() {
        let shop = Shop::new("ddl_recreate", INHERITED).await;
        shop.warm(&[1]).await;
        sqlx::raw_sql(
            "DROP TABLE products CASCADE;
             CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
               price_cents bigint NOT NULL);
             INSERT INTO products VALUES (1, 1, 'lamp', 999);",
        )
        .execute(&shop.admin)
        .await
        .unwrap();
        shop.fresh_within_bound(1, "a row of a table dropped and created again")
            .await;
        shop.connect_again().await.unwrap();
        shop.warm(&[1]).await;
        sqlx::query("UPDATE products SET price_cents = 1000 WHERE id = 1")
            .execute(&shop.pool)
            .await
            .unwrap();
        shop.fresh_now(1, "UPDATE of the new table").await;
    }

    #[tokio::test]
    async fn a_table_rewrite_invalidates_its_namespace() {
        let shop = Shop::new("ddl_rewrite", INHERITED).await;
        shop.warm(&[1]).await;
        sqlx::query(
            "ALTER TABLE products ALTER COLUMN price_cents TYPE numeric USING price_cents * 2",
        )
        .execute(&shop.admin)
        .await
        .unwrap();
        sqlx::query("ALTER TABLE products ALTER COLUMN price_cents TYPE bigint")
            .execute(&shop.admin)
            .await
            .unwrap();
        shop.fresh_within_bound(1, "a row rewritten by ALTER COLUMN … USING")
            .await;
    }

    #[tokio::test]
    async fn a_detached_partition_invalidates_the_tables_namespace() {
        let shop = Shop::new("ddl_detach", PARTITIONED).await;
        shop.warm(&[150]).await;
        sqlx::query("ALTER TABLE products DETACH PARTITION products_high")
            .execute(&shop.admin)
            .await
            .unwrap();
        shop.fresh_within_bound(150, "a row of a detached partition")
            .await;
        assert_eq!(shop.cached_price(150).await, None);
    }

    #[tokio::test]
    async fn a_rebuilt_table_swapped_in_with_rename_is_captured_at_once() {
        let shop = Shop::new("ddl_rename", INHERITED).await;
        shop.warm(&[1]).await;
        sqlx::raw_sql(
            "CREATE TABLE products_new (LIKE products INCLUDING ALL);
             INSERT INTO products_new SELECT id, category_id, name, price_cents * 10 FROM ONLY products;
             ALTER TABLE products RENAME TO products_old;
             ALTER TABLE products_new RENAME TO products;",
        )
        .execute(&shop.admin)
        .await
        .unwrap();
        shop.fresh_within_bound(1, "a row of the swapped-in table")
            .await;
        shop.connect_again().await.unwrap();
        shop.warm(&[1]).await;
        sqlx::query("UPDATE products SET price_cents = 7 WHERE id = 1")
            .execute(&shop.admin)
            .await
            .unwrap();
        shop.fresh_within_bound(1, "UPDATE of the swapped-in table")
            .await;
    }
}

/// The role that owns the tables but is not a superuser (managed PostgreSQL services) installs capture
/// without the DDL guard (event triggers need a superuser): writes are captured, and a pool connects.
#[tokio::test]
async fn an_owner_that_is_not_a_superuser_installs_without_the_ddl_guard() {
    let db = TestDb::create("owner").await;
    let admin = db.pool().await;
    let owner = format!("owner_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {owner}; CREATE ROLE {owner} LOGIN;
         GRANT CREATE ON DATABASE \"{}\" TO {owner}; GRANT CREATE ON SCHEMA public TO {owner};",
        db.name
    )))
    .execute(&admin)
    .await
    .unwrap();
    let options = (*admin.connect_options()).clone().username(&owner);
    let as_owner = PgPool::connect_with(options.clone()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(INHERITED.to_owned()))
        .execute(&as_owner)
        .await
        .unwrap();
    let pool = CachedPgPool::options()
        .registry(registry())
        .auto_install(true)
        .connect_with(options, MemoryStore::default())
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'cache\\_invalidation\\_%'",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(events, 0, "no DDL guard without a superuser");
    let price = || async {
        pool.cache()
            .get_or_load(key!("product:<id>", id = 1_i64), || async {
                sqlx::query_scalar::<_, i64>("SELECT price_cents FROM products WHERE id = 1")
                    .fetch_optional(&as_owner)
                    .await
            })
            .await
            .unwrap()
    };
    assert_eq!(price().await, Some(100));
    sqlx::query("UPDATE products SET price_cents = 5 WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(price().await, Some(5));
    pool.close().await;
    as_owner.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {owner} CASCADE; DROP ROLE {owner};"
    )))
    .execute(&admin)
    .await
    .unwrap();
}

/// Several services and builds on one database: installs are additive and owned.
mod shared_database {
    use std::collections::BTreeSet;

    use cache_runtime::backend::postgres::PgSchema;
    use tests::RecordingStore;
    use tests::model::Category;

    use super::*;

    /// The next build of the product entity: another dependent key (`shelf:<…>`), the same own key.
    #[derive(CachedEntity, sqlx::FromRow)]
    #[cached_entity(table = "products", key = "product:<pid>", depends = ["shelf:<category_id>"])]
    #[allow(dead_code)] // only its metadata is used
    struct ProductV2 {
        #[sqlx(rename = "id")]
        pid: i64,
        category_id: i64,
    }

    const TABLES: &str = "
CREATE TABLE categories (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL, name text NOT NULL,
  price_cents bigint NOT NULL);
INSERT INTO categories VALUES (1, 'lamps');
INSERT INTO products VALUES (1, 1, 'lamp', 100);
";

    async fn database(hint: &str) -> (TestDb, PgPool) {
        let db = TestDb::create(hint).await;
        let admin = db.pool().await;
        sqlx::raw_sql(TABLES).execute(&admin).await.unwrap();
        (db, admin)
    }

    async fn pool(
        db: &TestDb,
        registry: Registry,
        store: RecordingStore,
    ) -> Result<CachedPgPool, Error> {
        CachedPgPool::options()
            .registry(registry)
            .auto_install(true)
            .connect(&db.url, store)
            .await
    }

    /// The keys `store` saw invalidated once `sql` (by another client) was relayed.
    async fn relayed(
        admin: &PgPool,
        pool: &CachedPgPool,
        store: &RecordingStore,
        sql: &str,
    ) -> BTreeSet<String> {
        let before = store.calls().len();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(admin)
            .await
            .unwrap();
        let start = Instant::now();
        while store.calls().len() == before {
            assert!(start.elapsed() < RELAY_BOUND, "{sql}: not relayed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pool.relay().deliver_pending().await.unwrap();
        store.calls()[before..].iter().flatten().cloned().collect()
    }

    #[tokio::test]
    async fn two_services_with_disjoint_registries_keep_each_others_capture() {
        let (db, admin) = database("services").await;
        // One store for both (a row reaches the store of the relay that claims it: several stores on one
        // database are not supported yet).
        let a_store = RecordingStore::new(MemoryStore::default());
        let b_store = a_store.clone();
        let a = pool(&db, Registry::new([Product::META]), a_store.clone())
            .await
            .unwrap();
        let b = pool(&db, Registry::new([Category::META]), b_store.clone())
            .await
            .unwrap();
        // A installs again (a restart, a new pool): B's capture stays.
        let a2 = pool(
            &db,
            Registry::new([Product::META]),
            RecordingStore::new(MemoryStore::default()),
        )
        .await
        .unwrap();
        a2.close().await;
        let keys = relayed(
            &admin,
            &b,
            &b_store,
            "UPDATE categories SET name = 'x' WHERE id = 1",
        )
        .await;
        assert!(keys.contains("category:1"), "{keys:?}");
        let keys = relayed(
            &admin,
            &a,
            &a_store,
            "UPDATE products SET price_cents = 1 WHERE id = 1",
        )
        .await;
        assert!(keys.contains("product:1"), "{keys:?}");
    }

    #[tokio::test]
    async fn services_may_choose_different_trigger_modes() {
        let (db, _admin) = database("modes").await;
        let store = RecordingStore::new(MemoryStore::default());
        let statement = pool(&db, Registry::new([Product::META]), store.clone())
            .await
            .unwrap();
        let row = CachedPgPool::options()
            .registry(Registry::new([Category::META]))
            .trigger_mode(cache_runtime::backend::TriggerMode::Row)
            .auto_install(true)
            .connect(&db.url, store.clone())
            .await
            .unwrap();
        // Each service's next pool connects: its tables are checked against the mode they were installed in.
        for registry in [
            Registry::new([Product::META]),
            Registry::new([Category::META]),
        ] {
            CachedPgPool::options()
                .registry(registry)
                .run_relay(false)
                .connect(&db.url, store.clone())
                .await
                .unwrap()
                .close()
                .await;
        }
        statement.close().await;
        row.close().await;
    }

    #[tokio::test]
    async fn a_rolling_deploy_invalidates_the_keys_of_both_builds_until_the_old_one_is_retired() {
        let (db, admin) = database("rolling").await;
        let v1 = Registry::new([Product::META]);
        let v2 = Registry::new([ProductV2::META]);
        let store = RecordingStore::new(MemoryStore::default());
        let old = pool(&db, v1.clone(), store.clone()).await.unwrap();
        let new = pool(&db, v2.clone(), store.clone()).await.unwrap();
        // Both builds run: a write invalidates the keys each of them reads.
        let keys = relayed(
            &admin,
            &new,
            &store,
            "UPDATE products SET price_cents = 2 WHERE id = 1",
        )
        .await;
        for key in ["product:1", "category:1:products", "shelf:1"] {
            assert!(keys.contains(key), "{key}: {keys:?}");
        }
        // Both builds still connect (a restart of an old process during the deploy).
        pool(&db, v1.clone(), store.clone())
            .await
            .unwrap()
            .close()
            .await;
        // The old build's exported script would drop the new build's keys: it refuses.
        let error = sqlx::raw_sql(sqlx::AssertSqlSafe(PgSchema::new(&v1).sql()))
            .execute(&admin)
            .await
            .expect_err("the exported script refuses to drop another build's keys");
        assert!(
            error.to_string().contains("also captures table products"),
            "{error}"
        );
        // The old build is gone: retire it; only the new build's keys remain.
        old.close().await;
        let mut conn = admin.acquire().await.unwrap();
        PgSchema::new(&v2)
            .retire(&mut conn, &v1.fingerprint())
            .await
            .unwrap();
        drop(conn);
        let keys = relayed(
            &admin,
            &new,
            &store,
            "UPDATE products SET price_cents = 3 WHERE id = 1",
        )
        .await;
        assert!(
            keys.contains("shelf:1") && !keys.contains("category:1:products"),
            "{keys:?}"
        );
        match pool(&db, v1, RecordingStore::new(MemoryStore::default()))
            .await
            .map(drop)
        {
            // A retired build reinstalls on connect (auto_install): it joins again.
            Ok(()) => {}
            Err(other) => panic!("a retired build installs again: {other}"),
        }
    }
}

/// A build that no process has run for longer than the retention is retired by the next install.
#[tokio::test]
async fn an_install_retires_a_build_unseen_for_long() {
    use cache_runtime::backend::postgres::PgSchema;

    #[derive(CachedEntity, sqlx::FromRow)]
    #[cached_entity(table = "products", key = "product:<pid>", depends = ["aisle:<category_id>"])]
    #[allow(dead_code)] // only its metadata is used
    struct ProductNext {
        #[sqlx(rename = "id")]
        pid: i64,
        category_id: i64,
    }

    let shop = Shop::new("retire_unseen", INHERITED).await;
    let (old, new) = (registry(), Registry::new([ProductNext::META]));
    let install = || async {
        let mut conn = shop.admin.acquire().await.unwrap();
        PgSchema::new(&new).install(&mut conn).await.unwrap();
    };
    let installers = || async {
        let sql = "SELECT DISTINCT installer FROM cache_invalidation.capture_parts ORDER BY 1";
        sqlx::query_scalar::<_, String>(sql)
            .fetch_all(&shop.admin)
            .await
            .unwrap()
    };
    install().await;
    let mut both = vec![old.fingerprint(), new.fingerprint()];
    both.sort();
    assert_eq!(installers().await, both, "both builds recorded");
    // The old build's processes stopped two days ago.
    shop.pool.close().await;
    sqlx::query(
        "UPDATE cache_invalidation.capture_parts SET last_seen = now() - interval '2 days' WHERE installer = $1",
    )
    .bind(old.fingerprint())
    .execute(&shop.admin)
    .await
    .unwrap();
    install().await;
    assert_eq!(
        installers().await,
        [new.fingerprint()],
        "the old build retired"
    );
    sqlx::query("UPDATE products SET price_cents = 9 WHERE id = 1")
        .execute(&shop.admin)
        .await
        .unwrap();
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT unnest(keys) FROM cache_invalidation.outbox ORDER BY 1",
    )
    .fetch_all(&shop.admin)
    .await
    .unwrap();
    assert!(keys.contains(&"aisle:1".to_owned()), "{keys:?}");
    assert!(
        !keys.contains(&"category:1:products".to_owned()),
        "{keys:?}"
    );
}
