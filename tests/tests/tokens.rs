//! Read-your-writes tokens across OS processes: a write's token makes a read in another process (the
//! `token_reader` binary, with its own pool on the same database and Redis prefix) return that write,
//! whether the writer's store acknowledged the invalidation (the read uses the cache at once) or the
//! delivery has not happened yet (the read bypasses the cache, where a read without the token returns
//! the old value), and a delivery during the read's bounded wait ends the wait. Real PostgreSQL and
//! Redis.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use cache_runtime::outbox::RelayConfig;
use cache_runtime::token::{self, WriteToken};
use cache_runtime::{CachedEntity, CachedPgPool, RedisStore, Registry};
use serde::{Deserialize, Serialize};
use tests::{TestDb, TestPrefix};

/// The `token_reader`'s row.
#[derive(Debug, Clone, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

/// The other process.
struct Reader {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// What the reader saw: the version, and its cache's hits and bypassed reads so far.
#[derive(Debug, PartialEq)]
struct Seen {
    version: i64,
    hits: u64,
    bypassed: u64,
}

impl Reader {
    fn start(db: &TestDb, prefix: &TestPrefix) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_token_reader"))
            .env("DATABASE_URL", &db.url)
            .env("REDIS_URL", tests::redis_url())
            .env("CACHE_PREFIX", &prefix.prefix)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start token_reader");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut reader = Self {
            child,
            stdin,
            stdout,
        };
        assert_eq!(reader.line(), "ready");
        reader
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::task::block_in_place(|| self.stdout.read_line(&mut line)).expect("read_line");
        line.trim().to_owned()
    }

    fn read(&mut self, token: Option<WriteToken>) -> Seen {
        self.send(token);
        self.seen()
    }

    /// Asks for a read, without waiting for its answer.
    fn send(&mut self, token: Option<WriteToken>) {
        let arg = token.map_or_else(|| "-".to_owned(), |t| t.to_string());
        writeln!(self.stdin, "read {arg}").expect("write to token_reader");
    }

    /// The answer to the read asked for.
    fn seen(&mut self) -> Seen {
        let line = self.line();
        let fields: Vec<&str> = line.split(' ').collect();
        match fields.as_slice() {
            ["version", v, "hits", h, "bypassed", b] => Seen {
                version: v.parse().expect("version"),
                hits: h.parse().expect("hits"),
                bypassed: b.parse().expect("bypassed"),
            },
            _ => panic!("token_reader said {line:?}"),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pool on `db` and `prefix` whose relay delivers wrapped writers' rows only by hand (`relay_grace`,
/// and no relay task).
async fn pool(db: &TestDb, prefix: &TestPrefix, crash_after_commit: bool) -> CachedPgPool {
    let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("redis");
    CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .run_relay(false)
        .relay_config(RelayConfig::new().wrapped_grace(Duration::ZERO))
        .crash_after_commit(crash_after_commit)
        .connect(&db.url, store)
        .await
        .expect("pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_makes_another_process_read_the_write_even_before_its_delivery() {
    let db = TestDb::create("tokens").await;
    let prefix = TestPrefix::create("tokens").await;
    sqlx::raw_sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL); INSERT INTO items VALUES (1, 1);",
    )
    .execute(&db.pool().await)
    .await
    .expect("schema");
    let writer = pool(&db, &prefix, false).await;
    // Commits and leaves the keys in the outbox, as a writer whose store was unreachable does.
    let crashing = pool(&db, &prefix, true).await;
    let mut reader = Reader::start(&db, &prefix);
    assert_eq!(reader.read(None).version, 1);
    assert_eq!(reader.read(None).hits, 1, "the reader caches item 1");

    // Delivered by the writer: the token says so, and the reader uses its cache at once.
    let (updated, written) = token::scope(None, async {
        sqlx::query("UPDATE items SET version = 2 WHERE id = 1")
            .execute(&writer)
            .await
    })
    .await;
    updated.expect("update");
    let written = written.expect("an autocommit write in a scope records its token");
    assert!(
        written.acknowledged() && written.position() > 0,
        "{written}"
    );
    let seen = reader.read(Some(written));
    assert_eq!((seen.version, seen.bypassed), (2, 0), "{seen:?}");
    assert_eq!(reader.read(None).hits, 2, "the reader cached version 2");

    // Not delivered: the old entry is still in Redis, and only the token saves the read.
    let mut tx = crashing.begin().await.expect("begin");
    sqlx::query("UPDATE items SET version = 3 WHERE id = 1")
        .execute(&mut tx)
        .await
        .expect("update");
    let pending = tx.commit_with_token().await.expect("commit");
    assert!(
        !pending.acknowledged() && pending.position() > written.position(),
        "{pending}"
    );
    let parsed: WriteToken = pending.to_string().parse().expect("the token round-trips");
    assert_eq!(
        reader.read(None).version,
        2,
        "without the token the reader serves its cached version (delivery held back)"
    );
    let seen = reader.read(Some(parsed));
    assert_eq!(
        (seen.version, seen.bypassed),
        (3, 1),
        "the token bypasses the cache: {seen:?}"
    );

    // Delivered by a relay: the token is satisfied from the database's record, and the cache is used.
    let drained = writer.relay().deliver_pending().await.expect("deliver");
    assert!(drained.rows >= 1, "{drained:?}");
    let seen = reader.read(Some(parsed));
    assert_eq!((seen.version, seen.bypassed), (3, 1), "{seen:?}");
    let seen = reader.read(Some(parsed));
    assert_eq!(seen.version, 3);
    assert!(seen.hits >= 3, "the reader uses its cache again: {seen:?}");

    // Delivered while the reader waits (within its 300 ms `token_wait`): the wait ends with the
    // delivery, and the read uses the cache.
    let (_, pending) = token::scope(None, async {
        sqlx::query("UPDATE items SET version = 5 WHERE id = 1")
            .execute(&crashing)
            .await
    })
    .await;
    let pending = pending.expect("a token");
    assert!(!pending.acknowledged(), "{pending}");
    reader.send(Some(pending));
    tokio::time::sleep(Duration::from_millis(100)).await;
    writer.relay().deliver_pending().await.expect("deliver");
    let seen = reader.seen();
    assert_eq!((seen.version, seen.bypassed), (5, 1), "no bypass: {seen:?}");
    drop(reader);
    writer.close().await;
    crashing.close().await;
}

/// A SQLite pool on `db` and `prefix` whose relay only delivers by hand.
async fn sqlite_pool(
    db: &tests::TestSqlite,
    prefix: &TestPrefix,
    crash_after_commit: bool,
) -> cache_runtime::CachedSqlitePool {
    let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("redis");
    cache_runtime::CachedSqlitePool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .run_relay(false)
        .token_wait(Duration::from_millis(200))
        .crash_after_commit(crash_after_commit)
        .connect_with(db.options(), store)
        .await
        .expect("sqlite pool")
}

/// On SQLite, as on PostgreSQL: an undelivered write's token makes a reader bypass its cache until the
/// outbox rows are gone, then use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_token_is_honored_until_its_rows_are_delivered() {
    let db = tests::TestSqlite::create("tokens").await;
    let prefix = TestPrefix::create("tokens_sqlite").await;
    sqlx::raw_sql(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, version INTEGER NOT NULL); INSERT INTO items VALUES (1, 1);",
    )
    .execute(&db.pool().await)
    .await
    .expect("schema");
    let reader = sqlite_pool(&db, &prefix, false).await;
    let crashing = sqlite_pool(&db, &prefix, true).await;
    let version = |pool: cache_runtime::CachedSqlitePool| async move {
        pool.get::<Item>(&1)
            .await
            .expect("read")
            .expect("row")
            .version
    };
    assert_eq!(version(reader.clone()).await, 1);
    let mut tx = crashing.begin().await.expect("begin");
    sqlx::query("UPDATE items SET version = 2 WHERE id = 1")
        .execute(&mut tx)
        .await
        .expect("update");
    let token = tx.commit_with_token().await.expect("commit");
    assert!(!token.acknowledged() && token.position() > 0, "{token}");
    assert_eq!(
        version(reader.clone()).await,
        1,
        "the delivery is held back"
    );
    let (seen, _) = token::scope(Some(token), version(reader.clone())).await;
    assert_eq!(seen, 2, "the token's scope bypasses the cache");
    assert_eq!(reader.cache().stats().bypassed, 1);
    reader.relay().deliver_pending().await.expect("deliver");
    let hits = reader.cache().stats().hits;
    let (seen, _) = token::scope(Some(token), version(reader.clone())).await;
    assert_eq!(seen, 2);
    assert_eq!(
        reader.cache().stats().bypassed,
        1,
        "delivered: the cache is used"
    );
    let (seen, _) = token::scope(Some(token), version(reader.clone())).await;
    assert_eq!((seen, reader.cache().stats().hits), (2, hits + 1));
}
