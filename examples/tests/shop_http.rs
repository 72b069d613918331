//! Runs the `shop_http` service on PostgreSQL + Redis (`DATABASE_URL` / `REDIS_URL`, else the local
//! servers) and drives it over HTTP with a tiny HTTP/1.1 client: cached reads and hits, read-your-writes
//! after every admin write, lists of both categories when a product moves, tombstones removed by a create,
//! a page invalidated through its category tag, a write by a plain pool delivered by the relay, error
//! statuses, the live page; then `SIGTERM`, after which the service's database and Redis keys are gone. A
//! second test loads the live page in headless Chromium (`tests/setup.sh` installs it) and checks the
//! numbers its script shows.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{Connection as _, PgConnection};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// The running service. Dropping it (also when the test fails) stops the process and removes its database
/// and Redis keys if the process did not.
struct Service {
    child: Child,
    addr: String,
    database: String,
    prefix: String,
}

impl Service {
    /// Starts the binary on a free port and waits for its `listening on` line.
    fn start() -> Service {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shop_http"))
            .env("DATABASE_URL", database_url())
            .env("REDIS_URL", redis_url())
            .env("ADDR", "127.0.0.1:0")
            // A bound on its life if this test is killed before it can stop it.
            .env("SHOP_HTTP_SECONDS", "300")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the shop_http binary");
        let name = format!("shop_http_{}", child.id());
        let stdout = child.stdout.take().expect("the child's stdout");
        let mut service = Service {
            child,
            addr: String::new(),
            database: name.clone(),
            prefix: format!("{name}:"),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Forwards every line; keeps reading so that the service never writes into a closed pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            panic!(
                "shop_http printed no `listening on` line within 60 s (its stderr is above); it needs \
                 PostgreSQL at {} and Redis at {}: set DATABASE_URL / REDIS_URL to reachable servers",
                database_url(),
                redis_url()
            )
        });
        service.addr = first
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| {
                panic!("first line of stdout is not `listening on http://…`: {first}")
            })
            .to_owned();
        service
    }

    /// Sends `SIGTERM` and waits for the process to exit; returns whether it exited successfully.
    fn terminate(&mut self) -> Option<bool> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status.success());
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.success());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// One request; the status and the body.
    async fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let (status, _, body) = self.exchange(method, path, body).await;
        (status, body)
    }

    /// One request; the status, the head (status line and headers) and the body.
    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, String, String) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(&self.addr).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no response within 10 s"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let response = String::from_utf8(response).expect("a UTF-8 response");
        let (head, rest) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{method} {path}: no end of headers in {response:?}"));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{method} {path}: bad status line in {head:?}"));
        let length = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
        let body = match length {
            Some(n) => rest.get(..n).unwrap_or(rest),
            None => rest,
        };
        (status, head.to_owned(), body.to_owned())
    }

    /// A request expected to answer `status` with JSON.
    async fn json(&self, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
        let (got, text) = self.request(method, path, body).await;
        assert_eq!(got, status, "{method} {path} answered {got}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
    }

    async fn get(&self, path: &str) -> Value {
        self.json("GET", path, None, 200).await
    }

    /// `GET /stats`, as (hits, misses, loads, invalidations).
    async fn stats(&self) -> Counts {
        let s = self.get("/stats").await;
        let n = |name: &str| {
            s[name]
                .as_u64()
                .unwrap_or_else(|| panic!("/stats has no {name}: {s}"))
        };
        Counts {
            hits: n("hits"),
            misses: n("misses"),
            loads: n("loads"),
            invalidations: n("invalidations"),
        }
    }

    /// Whether Redis holds a value slot for `key` under the service's prefix.
    async fn in_redis(&self, key: &str) -> bool {
        let client = redis::Client::open(redis_url()).expect("REDIS_URL");
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis");
        redis::cmd("EXISTS")
            .arg(format!("{}{key}", self.prefix))
            .query_async::<bool>(&mut con)
            .await
            .expect("EXISTS")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.terminate().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Whatever the process did not remove. In a thread of its own: this may run inside the test's
        // runtime, which cannot block on another.
        let database = self.database.clone();
        let prefix = self.prefix.clone();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&database_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
                if let (Ok(keys), Ok(client)) = (
                    examples::prefix_keys(&redis_url(), &prefix).await,
                    redis::Client::open(redis_url()),
                ) && let Ok(mut con) = client.get_multiplexed_async_connection().await
                {
                    for key in keys {
                        let _ = redis::cmd("UNLINK")
                            .arg(key)
                            .query_async::<()>(&mut con)
                            .await;
                    }
                }
            });
        })
        .join();
    }
}

/// Counters read from `/stats`.
#[derive(Debug, Clone, Copy)]
struct Counts {
    hits: u64,
    misses: u64,
    loads: u64,
    invalidations: u64,
}

/// The ids of a JSON list of products.
fn ids(list: &Value) -> Vec<i64> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|p| p["id"].as_i64().unwrap_or_else(|| panic!("no id in {p}")))
        .collect()
}

#[tokio::test]
async fn the_shop_over_http_reads_its_writes_through_the_cache() {
    let mut service = Service::start();

    // A product: the first read loads it, the second is a hit; the value lives in Redis.
    let s0 = service.stats().await;
    let lamp = service.get("/products/1").await;
    assert_eq!(
        lamp,
        json!({"id": 1, "category_id": 1, "name": "Desk lamp", "price_cents": 4999})
    );
    let s1 = service.stats().await;
    assert_eq!((s1.loads - s0.loads, s1.hits - s0.hits), (1, 0), "{s1:?}");
    assert!(s1.misses > s0.misses, "{s1:?}");
    assert_eq!(service.get("/products/1").await, lamp);
    let s2 = service.stats().await;
    assert_eq!(
        (s2.loads - s1.loads, s2.hits - s1.hits),
        (0, 1),
        "the second read is a hit: {s2:?}"
    );
    assert!(service.in_redis("product:1").await);

    // A new price: the response of the write, and the next read, have it (the entry was invalidated
    // before the response and is loaded again).
    let updated = service
        .json(
            "PUT",
            "/admin/products/1",
            Some(json!({"price_cents": 3999})),
            200,
        )
        .await;
    assert_eq!(updated["price_cents"], 3999, "{updated}");
    let s3 = service.stats().await;
    assert!(s3.invalidations > s2.invalidations, "{s3:?}");
    // Behind the token layer: a write's response carries its read-your-writes token; a read's does not.
    let (_, head, _) = service
        .exchange(
            "PUT",
            "/admin/products/1",
            Some(json!({"price_cents": 3999})),
        )
        .await;
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\nx-cache-token: w1."), "{head}");
    assert!(head.contains("\r\nset-cookie: cache_token=w1."), "{head}");
    let s3 = service.stats().await;
    assert_eq!(service.get("/products/1").await["price_cents"], 3999);
    let s4 = service.stats().await;
    assert_eq!(
        s4.loads - s3.loads,
        1,
        "loaded again after the write: {s4:?}"
    );
    let (_, head, _) = service.exchange("GET", "/products/1", None).await;
    assert!(
        !head.to_ascii_lowercase().contains("x-cache-token"),
        "a read sends no token: {head}"
    );
    let s4 = service.stats().await;

    // The lists of both categories, cached (the second reads are hits), then product 2 moves.
    for _ in 0..2 {
        assert_eq!(ids(&service.get("/categories/1/products").await), [1, 2]);
        assert_eq!(ids(&service.get("/categories/2/products").await), [3]);
    }
    let s5 = service.stats().await;
    assert_eq!(s5.hits - s4.hits, 2, "{s5:?}");
    // The first page of category 1 (a variant of its list key), cached before the move.
    for _ in 0..2 {
        assert_eq!(
            ids(&service.get("/categories/1/products/page/1").await),
            [1, 2]
        );
    }
    assert!(service.in_redis("category:1:products:page:1").await);
    assert!(service.in_redis("category:1:products").await);
    let moved = service
        .json(
            "PUT",
            "/admin/products/2",
            Some(json!({"category_id": 2, "name": "Kitchen lamp"})),
            200,
        )
        .await;
    assert_eq!(
        (&moved["category_id"], &moved["name"]),
        (&json!(2), &json!("Kitchen lamp"))
    );
    assert_eq!(ids(&service.get("/categories/1/products").await), [1]);
    assert_eq!(
        ids(&service.get("/categories/1/products/page/1").await),
        [1],
        "the page, a variant of the list, was invalidated with it"
    );
    let kitchen = service.get("/categories/2/products").await;
    assert_eq!(ids(&kitchen), [2, 3]);
    assert_eq!(kitchen[0]["name"], "Kitchen lamp");

    // The page joins the category: cached once its tag exists, then renaming the category invalidates it.
    let mut hit = false;
    for _ in 0..3 {
        let before = service.stats().await;
        let page = service.get("/products/3/page").await;
        assert_eq!(
            (&page["name"], &page["category"]),
            (&json!("Kettle"), &json!("Kitchen"))
        );
        if service.stats().await.hits > before.hits {
            hit = true;
            break;
        }
    }
    assert!(hit, "the page was never a cache hit");
    service
        .json(
            "PUT",
            "/admin/categories/2",
            Some(json!({"name": "Cookware"})),
            200,
        )
        .await;
    assert_eq!(
        service.get("/products/3/page").await["category"],
        "Cookware"
    );

    // Delete: 404, and the 404 is a cached tombstone (the second read is a hit); creating the product
    // again removes the tombstone.
    let (status, _) = service.request("DELETE", "/admin/products/2", None).await;
    assert_eq!(status, 204);
    service.json("GET", "/products/2", None, 404).await;
    let before = service.stats().await;
    service.json("GET", "/products/2", None, 404).await;
    let after = service.stats().await;
    assert_eq!(
        (after.hits - before.hits, after.loads - before.loads),
        (1, 0),
        "the tombstone is a hit: {after:?}"
    );
    let created = service
        .json(
            "POST",
            "/admin/products",
            Some(json!({"id": 2, "category_id": 1, "name": "Reading lamp", "price_cents": 5999})),
            201,
        )
        .await;
    assert_eq!(created["name"], "Reading lamp");
    assert_eq!(service.get("/products/2").await["name"], "Reading lamp");
    assert_eq!(ids(&service.get("/categories/1/products").await), [1, 2]);
    // Without an id: the table's identity gives one.
    let pan = service
        .json(
            "POST",
            "/admin/products",
            Some(json!({"category_id": 2, "name": "Pan", "price_cents": 1999})),
            201,
        )
        .await;
    let pan_id = pan["id"].as_i64().unwrap_or_else(|| panic!("{pan}"));
    assert!(pan_id >= 100, "{pan}");
    assert_eq!(service.get(&format!("/products/{pan_id}")).await, pan);

    // Errors: a missing product, a category that does not exist, a duplicate id, a body that is not JSON.
    service
        .json(
            "PUT",
            "/admin/products/999",
            Some(json!({"price_cents": 1})),
            404,
        )
        .await;
    let error = service
        .json(
            "PUT",
            "/admin/products/1",
            Some(json!({"category_id": 999})),
            422,
        )
        .await;
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("no such category")),
        "{error}"
    );
    service
        .json(
            "POST",
            "/admin/products",
            Some(json!({"id": 1, "category_id": 1, "name": "Twin", "price_cents": 1})),
            409,
        )
        .await;
    let (status, _) = service.request("DELETE", "/admin/products/999", None).await;
    assert_eq!(status, 404);
    let (status, _) = service
        .request("POST", "/admin/products", Some(json!("not a product")))
        .await;
    assert_eq!(status, 422);

    // Another service writes with a plain pool: the relay invalidates product 3, the next reads see it.
    assert_eq!(service.get("/products/3").await["price_cents"], 2999);
    let before = service.stats().await;
    assert_eq!(service.get("/products/3").await["price_cents"], 2999);
    assert_eq!(
        service.stats().await.hits - before.hits,
        1,
        "product 3 is cached"
    );
    let other = sqlx::PgPool::connect(&examples::database_url(&database_url(), &service.database))
        .await
        .expect("connect to the service's database");
    sqlx::query("UPDATE products SET price_cents = 2499 WHERE id = 3")
        .execute(&other)
        .await
        .expect("UPDATE by a plain pool");
    other.close().await;
    let committed = Instant::now();
    loop {
        let price = service.get("/products/3").await["price_cents"].clone();
        if price == 2499 {
            break;
        }
        assert!(
            committed.elapsed() < Duration::from_secs(5),
            "the foreign write was not visible within 5 s (still {price})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The live page, and the counters it polls.
    let (status, html) = service.request("GET", "/", None).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("fetch(\"/stats\")") && html.contains("invalidations"),
        "{html}"
    );
    let end = service.stats().await;
    // Every load followed a miss.
    assert!(end.hits >= 6 && end.misses >= end.loads, "{end:?}");

    // SIGTERM: a clean exit that drops the database and deletes the keys.
    assert_eq!(
        service.terminate(),
        Some(true),
        "shop_http did not exit cleanly on SIGTERM"
    );
    let mut admin = PgConnection::connect(&database_url())
        .await
        .expect("connect to PostgreSQL");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)")
            .bind(&service.database)
            .fetch_one(&mut admin)
            .await
            .expect("query pg_database");
    assert!(
        !exists,
        "the service left its database {}",
        service.database
    );
    let left = examples::prefix_keys(&redis_url(), &service.prefix)
        .await
        .expect("SCAN");
    assert!(left.is_empty(), "the service left Redis keys: {left:?}");
}

/// The `chromium` binary (`CHROMIUM` to name another), or a failure saying how to install it.
fn chromium() -> String {
    let name = std::env::var("CHROMIUM")
        .ok()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "chromium".to_owned());
    let found = Command::new(&name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "this test loads the live page in headless Chromium, and `{name}` cannot be run: install it with \
         `tests/setup.sh` (as root; it runs `apt-get install -y --no-install-recommends chromium`), or set \
         CHROMIUM to a Chromium binary"
    );
    name
}

/// Loads `url` in headless Chromium, lets its scripts run for `budget` of virtual time, and returns the DOM.
fn dump_dom(chromium: &str, url: &str, budget: Duration) -> String {
    let dir = std::env::temp_dir().join(format!("shop_http_chromium_{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let out = dir.join("dom.html");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg("--dump-dom")
        .arg(url)
        .stdout(std::fs::File::create(&out).expect("create the DOM file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    match status {
        Some(s) if s.success() => dom,
        Some(s) => panic!("chromium --dump-dom {url} failed ({s}):\n{dom}"),
        None => panic!("chromium --dump-dom {url} did not finish within 60 s"),
    }
}

/// The text of the element with `id` in `dom` (the page's cells are `<td id="…">N</td>`).
fn cell<'a>(dom: &'a str, id: &str) -> &'a str {
    let open = format!("id=\"{id}\">");
    let start = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no element {id} in:\n{dom}"))
        + open.len();
    let end = dom[start..]
        .find('<')
        .unwrap_or_else(|| panic!("unclosed element {id} in:\n{dom}"));
    &dom[start..start + end]
}

#[tokio::test]
async fn the_live_page_shows_the_counters_in_chromium() {
    let chromium = chromium();
    let service = Service::start();
    // A hit, a miss and a write: every counter the page shows is non-zero.
    service.get("/products/1").await;
    service.get("/products/1").await;
    service
        .json(
            "PUT",
            "/admin/products/1",
            Some(json!({"name": "Lamp"})),
            200,
        )
        .await;
    let before = service.stats().await;
    let url = format!("http://{}/", service.addr);
    let dom =
        tokio::task::spawn_blocking(move || dump_dom(&chromium, &url, Duration::from_millis(3500)))
            .await
            .expect("the chromium task");
    let after = service.stats().await;
    let shown = |id: &str| -> u64 {
        cell(&dom, id)
            .parse()
            .unwrap_or_else(|_| panic!("{id} shows no number (did the script run?):\n{dom}"))
    };
    // Nothing but the page's polls reached the service meanwhile, and they change no counter.
    assert_eq!(
        (shown("hits"), shown("misses")),
        (before.hits, before.misses),
        "{dom}"
    );
    assert_eq!((before.hits, after.hits), (1, 1), "{after:?}");
    let invalidations = shown("invalidations");
    assert!(
        invalidations >= 1 && (before.invalidations..=after.invalidations).contains(&invalidations),
        "invalidations shown {invalidations}, /stats {before:?} then {after:?}:\n{dom}"
    );
    // The page polled every second: several times in 3.5 s.
    let status = cell(&dom, "status");
    let polls: u32 = status
        .rsplit_once("(poll ")
        .and_then(|(_, n)| n.strip_suffix(')'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no poll count in the status {status:?}:\n{dom}"));
    assert!(polls >= 3, "{polls} polls in 3.5 s:\n{dom}");
}
