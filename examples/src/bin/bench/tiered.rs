//! The two-tier rows: an in-process tier hit against a raw moka get, a Redis-tier hit against a raw
//! `GET`, and the fan-out delay of an invalidation to the tiers of 3 other processes.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cache_runtime::{Cache, Key, RedisStore, TieredStore};
use examples::{Report, Samples};

use super::{BoxError, Env, Product};

/// The argument that makes the bench binary a fan-out listener process.
pub(crate) const LISTENER: &str = "--fanout-listener";

/// Listener processes of the fan-out rows.
const LISTENERS: usize = 3;

/// The key of round `i` of the fan-out rows.
fn fanout_key(i: usize) -> Key {
    Product::cache_key_for(&(i64::try_from(i).unwrap_or(0) + 1))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A tier on `env`'s Redis, under the sub-prefix `sub`, serving.
async fn tier(redis_url: &str, prefix: &str, capacity: u64) -> Result<TieredStore, BoxError> {
    let store = TieredStore::builder().capacity(capacity).build(
        RedisStore::connect(redis_url, prefix.to_owned()).await?,
        redis::Client::open(redis_url)?,
    );
    if !store.ready(Duration::from_secs(5)).await {
        return Err("the in-process tier did not come up".into());
    }
    Ok(store)
}

async fn product(cache: &Cache, id: i64) -> Result<Product, BoxError> {
    let value = Product {
        id,
        category_id: id % 100,
        name: format!("Product number {id}"),
        price_cents: id,
        version: 0,
    };
    Ok(cache
        .get_or_load(Product::cache_key_for(&id), || async move {
            Ok::<_, std::convert::Infallible>(value)
        })
        .await
        .map_err(|e| e.to_string())?)
}

/// Hit rows: raw moka get + decode (baseline), the tier's hit, raw `GET` + decode, a hit of a tier that
/// holds nothing (every peek goes to Redis), a `RedisStore` hit.
pub(crate) async fn hits(env: &Env, report: &mut Report) -> Result<(), BoxError> {
    let prefix = format!("{}tier:", env.prefix);
    let l1 = Cache::new(tier(&env.redis_url, &prefix, 10_000).await?);
    let l2 = Cache::new(tier(&env.redis_url, &prefix, 0).await?);
    let redis = Cache::new(RedisStore::connect(&env.redis_url, prefix.clone()).await?);
    let value = product(&l1, 1).await?;
    let bytes = rmp_serde::to_vec(&value)?;
    let moka: moka::sync::Cache<String, Vec<u8>> = moka::sync::Cache::new(10_000);
    moka.insert("product:1".to_owned(), bytes.clone());
    let mut conn = env.redis()?;
    let raw_key = format!("{prefix}raw:product:1");
    redis::cmd("SET")
        .arg(&raw_key)
        .arg(&bytes)
        .query_async::<()>(&mut conn)
        .await?;
    let names = [
        "raw moka get + decode (baseline)",
        "get_or_load, TieredStore in-process tier hit",
        "raw GET + decode, Redis",
        "get_or_load, TieredStore Redis-tier hit (tier holds nothing)",
        "get_or_load, RedisStore hit",
    ];
    let mut s = vec![Samples::default(); names.len()];
    for i in 0..env.sizes.reads {
        for v in 0..names.len() {
            let k = (i + v) % names.len();
            let start = Instant::now();
            let got: Product = match k {
                0 => rmp_serde::from_slice(&moka.get("product:1").ok_or("moka entry gone")?)?,
                1 => product(&l1, 1).await?,
                2 => {
                    let b: Vec<u8> = redis::cmd("GET")
                        .arg(&raw_key)
                        .query_async(&mut conn)
                        .await?;
                    rmp_serde::from_slice(&b)?
                }
                3 => product(&l2, 1).await?,
                _ => product(&redis, 1).await?,
            };
            s[k].push(start.elapsed());
            if got != value {
                return Err("a hit returned another value".into());
            }
        }
    }
    let group = "two tiers: hit";
    let (moka_base, get_base) = (s[0].stats(), s[2].stats());
    for (k, (name, s)) in names.iter().zip(&s).enumerate() {
        let base = if k < 2 { moka_base } else { get_base };
        report.latency(group, name, s.stats(), Some(base.median_us));
    }
    report.fact(
        "two tiers: hit",
        "ratios: the in-process tier vs raw moka; the Redis rows vs raw GET",
    );
    Ok(())
}

/// The fan-out rows: this process invalidates a key held in the tiers of 3 listener processes; each
/// reports when its tier dropped it. Delay = drop time − the invalidation's acknowledgement.
pub(crate) async fn fanout(env: &Env, report: &mut Report) -> Result<(), BoxError> {
    let rounds = env.sizes.misses.min(300);
    let prefix = format!("{}fanout:", env.prefix);
    let writer = tier(&env.redis_url, &prefix, 10_000).await?;
    let cache = Cache::new(writer.clone());
    let exe = std::env::current_exe()?;
    let mut listeners = Vec::new();
    for _ in 0..LISTENERS {
        let mut child = Command::new(&exe)
            .args([LISTENER, &env.redis_url, &prefix])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("listener stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("listener stdout")?);
        listeners.push((child, stdin, stdout.lines()));
    }
    let (mut delays, mut sent, mut own) =
        (Samples::default(), Samples::default(), Samples::default());
    for i in 0..rounds {
        product(&cache, i64::try_from(i)? + 1).await?;
        for (_, stdin, lines) in &mut listeners {
            writeln!(stdin, "{i}")?;
            let line = lines.next().ok_or("listener gone")??;
            if line != format!("held {i}") {
                return Err(format!("listener: {line}").into());
            }
        }
        let (start, called) = (Instant::now(), now_us());
        cache.invalidate([fanout_key(i).as_str()]).await?;
        own.push(start.elapsed());
        let acked = now_us();
        for (_, _, lines) in &mut listeners {
            let line = lines.next().ok_or("listener gone")??;
            let gone: u64 = line
                .strip_prefix("gone ")
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| format!("listener: {line}"))?;
            delays.push(Duration::from_micros(gone.saturating_sub(acked)));
            sent.push(Duration::from_micros(gone.saturating_sub(called)));
        }
    }
    for (mut child, stdin, _) in listeners {
        drop(stdin);
        child.wait()?;
    }
    let group = "two tiers: invalidation fan-out, 3 listener processes";
    report.latency(
        group,
        "invalidate through the writer's TieredStore (ack)",
        own.stats(),
        None,
    );
    report.latency(
        group,
        "ack → key gone from another process's tier (0 when before the ack)",
        delays.stats(),
        None,
    );
    report.latency(
        group,
        "invalidate called → key gone from another process's tier",
        sent.stats(),
        None,
    );
    report.fact(
        "fan-out",
        format!(
            "{rounds} keys × {LISTENERS} processes; pub/sub published in the invalidation's pipeline; \
             listeners poll their tier every 20 µs; the writer's own tier is cleared before the ack"
        ),
    );
    Ok(())
}

/// A listener process: for each round number read on stdin, holds the round's key in its tier, says
/// `held`, then reports `gone <µs>` when the tier dropped it.
pub(crate) async fn listen() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(2);
    let (url, prefix) = (
        args.next().ok_or("redis url")?,
        args.next().ok_or("prefix")?,
    );
    let store = tier(&url, &prefix, 10_000).await?;
    let cache = Cache::new(store.clone());
    let mut out = std::io::stdout();
    for line in std::io::stdin().lines() {
        let i: usize = line?.trim().parse()?;
        let key = fanout_key(i);
        product(&cache, i64::try_from(i)? + 1).await?;
        if !store.holds(key.as_str()) {
            return Err("the key is not in the tier after a read".into());
        }
        writeln!(out, "held {i}")?;
        out.flush()?;
        while store.holds(key.as_str()) {
            std::thread::sleep(Duration::from_micros(20));
        }
        writeln!(out, "gone {}", now_us())?;
        out.flush()?;
    }
    Ok(())
}
