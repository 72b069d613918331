//! Runs the `shop` example (the README's first command) and checks its claims, so it cannot rot: once with
//! no environment (SQLite in a temporary file + the in-process store: needs no server) and once on
//! PostgreSQL + Redis (`DATABASE_URL` / `REDIS_URL` if they name such servers, else the local defaults).

use std::process::Command;

/// Runs the shop with exactly `env` (`DATABASE_URL` and `REDIS_URL` are removed first) and returns its
/// standard output, after checking the claims every backend must make.
fn run_shop(env: &[(&str, &str)], needs: &str) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shop"));
    cmd.env_remove("DATABASE_URL").env_remove("REDIS_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the shop example");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "shop failed ({needs}):\n{stdout}\n{stderr}"
    );
    let step = |n: u32| {
        let start = stdout
            .find(&format!("step {n}:"))
            .unwrap_or_else(|| panic!("no step {n} in:\n{stdout}"));
        let end = stdout[start + 1..]
            .find("\nstep ")
            .map_or(stdout.len(), |e| start + 1 + e);
        stdout[start..end].to_owned()
    };
    assert!(step(1).contains(
        "cached now: product:1, product:1:page, product:3:page, category:1:products, category:2:products"
    ), "{stdout}");
    // Autocommit UPDATE through the pool: the product, its page, its category's list.
    assert!(
        step(2).contains("invalidated: product:1, product:1:page, category:1:products"),
        "{stdout}"
    );
    assert!(step(2).contains("price_cents: 3999"), "{stdout}");
    // A transaction moving a product: the lists of the old and the new category.
    assert!(
        step(3).contains("invalidated: category:1:products, category:2:products"),
        "{stdout}"
    );
    assert!(
        step(3).contains("(2, \"Kitchen lamp\", 8999), (3, \"Kettle\", 2999)"),
        "{stdout}"
    );
    assert!(step(4).contains("invalidated: nothing"), "{stdout}");
    // A category rename invalidates the page that joined it, through its tag.
    assert!(step(5).contains("category:1 (tag)"), "{stdout}");
    assert!(step(5).contains("category: \"Lighting\""), "{stdout}");
    // A plain pool: the relay delivers.
    assert!(
        step(6).contains("the relay invalidated product:3:page"),
        "{stdout}"
    );
    assert!(
        step(6).contains("invalidated: product:3:page, category:2:products"),
        "{stdout}"
    );
    assert!(step(6).contains("price_cents: 2499"), "{stdout}");
    // Every read, checked here rather than by the example's own verdict: what the cache returned equals
    // what the database held right after it, and the cache did serve hits (it is not bypassed).
    let reads: Vec<(&str, &str, &str)> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("  read "))
        .map(|read| {
            let (head, rest) = read
                .split_once(": ")
                .expect("read line: `key how verdict: value`");
            let (cached, database) = rest
                .strip_suffix(')')
                .and_then(|r| r.split_once(" (database: "))
                .unwrap_or_else(|| panic!("read line without the database value: {read}"));
            (head, cached, database)
        })
        .collect();
    assert!(reads.len() >= 15, "{} reads:\n{stdout}", reads.len());
    for (head, cached, database) in &reads {
        assert_eq!(cached, database, "stale read ({head}):\n{stdout}");
    }
    let hits = reads
        .iter()
        .filter(|(head, ..)| head.contains("cache hit"))
        .count();
    assert!(hits >= 5, "{hits} cache hits:\n{stdout}");
    assert!(!stdout.contains("STALE"), "{stdout}");
    assert!(
        stdout.contains("every read after every write was fresh."),
        "{stdout}"
    );
    stdout
}

#[test]
fn default_runs_on_sqlite_and_the_in_process_store_without_servers() {
    let stdout = run_shop(&[], "SQLite + in-process store: no server needed");
    assert!(
        stdout.contains("using SQLite in a temporary file")
            && stdout.contains("in-process MemoryStore"),
        "{stdout}"
    );
    assert!(stdout.contains("plain SqlitePool"), "{stdout}");
    assert!(stdout.contains("\nremoved "), "{stdout}");
}

#[test]
fn with_database_url_and_redis_url_runs_on_postgres_and_redis() {
    let database_url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let needs = format!(
        "this test needs PostgreSQL at {database_url} and Redis at {redis_url}; set DATABASE_URL / \
         REDIS_URL to reachable servers"
    );
    let stdout = run_shop(
        &[("DATABASE_URL", &database_url), ("REDIS_URL", &redis_url)],
        &needs,
    );
    assert!(
        stdout.contains("using PostgreSQL") && stdout.contains("+ Redis at"),
        "{stdout}"
    );
    assert!(stdout.contains("plain PgPool"), "{stdout}");
    assert!(stdout.contains("dropped database"), "{stdout}");
}
