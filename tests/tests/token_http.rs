//! The tower layer carries read-your-writes tokens between HTTP requests served by two instances (two
//! axum servers, each with its own pool, on one database and one Redis prefix): a user who writes on one
//! instance and reads on the other sees the write, through the response's cookie or header, even though
//! the writing instance's invalidation never reached Redis (its delivery is held back, as when its store
//! is unreachable). Real PostgreSQL and Redis; real TCP.

use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, put};
use cache_runtime::layer::TokenLayer;
use cache_runtime::outbox::RelayConfig;
use cache_runtime::{CachedEntity, CachedPgPool, RedisStore, Registry};
use serde::{Deserialize, Serialize};
use tests::{TestDb, TestPrefix};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A versioned row.
#[derive(Debug, Clone, CachedEntity, Serialize, Deserialize, sqlx::FromRow)]
#[cached_entity(table = "items", key = "item:<id>", ttl = "1m")]
struct Item {
    id: i64,
    version: i64,
}

async fn read(State(pool): State<CachedPgPool>, Path(id): Path<i64>) -> String {
    match pool.get::<Item>(&id).await {
        Ok(Some(item)) => item.version.to_string(),
        other => format!("error {other:?}"),
    }
}

async fn write(State(pool): State<CachedPgPool>, Path((id, version)): Path<(i64, i64)>) -> String {
    let updated = sqlx::query("UPDATE items SET version = $1 WHERE id = $2")
        .bind(version)
        .bind(id)
        .execute(&pool)
        .await;
    match updated {
        Ok(_) => "ok".to_owned(),
        Err(error) => format!("error {error}"),
    }
}

/// An instance: the app on a pool, behind the token layer, on a free port. Returns its address.
async fn instance(db: &TestDb, prefix: &TestPrefix, crash_after_commit: bool) -> String {
    let store = RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
        .await
        .expect("redis");
    let pool = CachedPgPool::options()
        .registry(Registry::new([Item::META]))
        .auto_install(true)
        .run_relay(false)
        .relay_config(RelayConfig::new().wrapped_grace(Duration::from_secs(60)))
        .crash_after_commit(crash_after_commit)
        .connect(&db.url, store)
        .await
        .expect("pool");
    let app = Router::new()
        .route("/items/{id}", get(read))
        .route("/items/{id}/{version}", put(write))
        .with_state(pool)
        .layer(TokenLayer::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A response: its headers (lower-case names) and body.
struct Response {
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `headers`, on a connection of its own.
async fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut text = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("content-length: 0\r\n\r\n");
    stream.write_all(text.as_bytes()).await.expect("send");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("receive");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Response {
        headers,
        body: body.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_reads_their_write_on_another_instance_through_the_cookie_or_header() {
    let db = TestDb::create("token_http").await;
    let prefix = TestPrefix::create("token_http").await;
    sqlx::raw_sql(
        "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL); INSERT INTO items VALUES (1, 1);",
    )
    .execute(&db.pool().await)
    .await
    .expect("schema");
    // The writing instance commits and leaves the keys in the outbox (its store unreachable, say).
    let writer = instance(&db, &prefix, true).await;
    let reader = instance(&db, &prefix, false).await;
    assert_eq!(request(&reader, "GET", "/items/1", &[]).await.body, "1");
    let plain = request(&reader, "GET", "/items/1", &[]).await;
    assert_eq!(plain.body, "1");
    assert_eq!(
        plain.header("x-cache-token"),
        None,
        "a read writes no token"
    );

    let written = request(&writer, "PUT", "/items/1/2", &[]).await;
    assert_eq!(written.body, "ok");
    let token = written
        .header("x-cache-token")
        .expect("the write's token")
        .to_owned();
    assert!(
        token.ends_with(".p"),
        "not acknowledged by the store: {token}"
    );
    let cookie = written.header("set-cookie").expect("the token's cookie");
    assert!(
        cookie.starts_with(&format!("cache_token={token};")),
        "{cookie}"
    );
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("Max-Age=300"),
        "{cookie}"
    );

    assert_eq!(
        request(&reader, "GET", "/items/1", &[]).await.body,
        "1",
        "another user (no token) still gets the cached version: the delivery is held back"
    );
    let cookie_pair = format!("cache_token={token}");
    let by_cookie = request(&reader, "GET", "/items/1", &[("cookie", &cookie_pair)]).await;
    assert_eq!(
        by_cookie.body, "2",
        "the user's cookie makes the other instance read the write"
    );
    assert_eq!(
        by_cookie.header("set-cookie"),
        None,
        "a read does not reset the cookie"
    );
    let by_header = request(&reader, "GET", "/items/1", &[("x-cache-token", &token)]).await;
    assert_eq!(by_header.body, "2");
}
