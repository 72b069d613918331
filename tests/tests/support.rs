//! The test support itself works against the real servers (and fails loudly when they are missing).

use tests::{RedisServer, TestDb, TestPrefix};

#[tokio::test]
async fn a_test_database_is_fresh_and_dropped() {
    let db = TestDb::create("support").await;
    let pool = db.pool().await;
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(name, db.name);
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(&pool)
            .await
            .expect("query");
    assert_eq!(tables, 0);
    pool.close().await;
    let name = db.name.clone();
    drop(db);
    let admin = sqlx::PgPool::connect(&tests::database_url())
        .await
        .expect("admin");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(&admin)
        .await
        .expect("query");
    assert_eq!(left, 0, "the test database is dropped");
}

#[tokio::test]
async fn a_test_prefix_sees_and_cleans_only_its_keys() {
    let a = TestPrefix::create("support_a").await;
    let b = TestPrefix::create("support_b").await;
    a.set("k1", "v").await;
    a.set("k2", "v").await;
    b.set("k1", "v").await;
    assert_eq!(a.keys().await, ["k1", "k2"]);
    assert!(b.exists("k1").await && !b.exists("k2").await);
    let (prefix, conn) = (a.prefix.clone(), a.conn.clone());
    drop(a);
    let mut conn = conn;
    let n: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}k1"))
        .query_async(&mut conn)
        .await
        .expect("exists");
    assert_eq!(n, 0, "dropped prefix is cleaned");
    assert!(b.exists("k1").await, "other prefixes survive");
}

#[test]
fn an_own_redis_server_can_be_killed_and_restarted() {
    let mut server = RedisServer::start();
    let client = redis::Client::open(server.url()).expect("url");
    let mut conn = client.get_connection().expect("connect");
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query::<()>(&mut conn)
        .expect("set");
    server.kill();
    assert!(
        redis::cmd("GET")
            .arg("k")
            .query::<Option<String>>(&mut conn)
            .is_err(),
        "server is down"
    );
    server.restart();
    let mut conn = client.get_connection().expect("reconnect");
    assert_eq!(
        redis::cmd("GET")
            .arg("k")
            .query::<Option<String>>(&mut conn)
            .expect("get"),
        None,
        "data is gone"
    );
}
