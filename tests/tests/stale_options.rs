//! The explicit, bounded stale options on Redis: `stale_while_revalidate(bound)` returns the value this
//! process last saw valid while another process holds the key's lease (reloading it), only within the
//! bound; `stale_on_error(bound)` returns it when the loader fails, only within the bound; neither applies
//! to a read without the option. Two caches on one Redis prefix stand for two processes.

use std::time::{Duration, Instant};

use cache_runtime::{Cache, CachedEntity, LoadOptions, RedisStore, key};
use tests::TestPrefix;

/// Declares the key template.
#[allow(dead_code)]
#[derive(CachedEntity)]
#[cached_entity(table = "notes", key = "note:<id>")]
struct Note {
    id: i64,
}

async fn cache(prefix: &TestPrefix) -> Cache {
    Cache::new(
        RedisStore::connect(&tests::redis_url(), prefix.prefix.clone())
            .await
            .expect("redis"),
    )
}

type Loaded = Result<String, std::sync::Arc<std::io::Error>>;

async fn read(cache: &Cache, options: LoadOptions, value: &'static str) -> Loaded {
    cache
        .get_or_load_with(key!("note:<id>", id = 1), options, || async move {
            Ok::<_, std::io::Error>(value.to_owned())
        })
        .await
}

/// Another process's miss: holds the lease for `hold` while it loads `value`.
fn slow_load(
    other: &Cache,
    value: &'static str,
    hold: Duration,
) -> tokio::task::JoinHandle<Loaded> {
    let other = other.clone();
    tokio::spawn(async move {
        other
            .get_or_load(key!("note:<id>", id = 1), || async move {
                tokio::time::sleep(hold).await;
                Ok::<_, std::io::Error>(value.to_owned())
            })
            .await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_returns_the_last_value_only_within_its_bound() {
    let prefix = TestPrefix::create("swr").await;
    let (cache, other) = (cache(&prefix).await, cache(&prefix).await);
    let swr = || LoadOptions::new().stale_while_revalidate(Duration::from_secs(2));
    assert_eq!(read(&cache, swr(), "v1").await.expect("read"), "v1");
    cache.invalidate(["note:1"]).await.expect("invalidate");
    let reloading = slow_load(&other, "v2", Duration::from_millis(600));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    let stale = read(&cache, swr(), "unused").await.expect("read");
    assert_eq!(
        stale, "v1",
        "the value seen within the bound, while the other process reloads"
    );
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "without waiting for the lease"
    );
    assert_eq!(cache.stats().stale_served, 1);
    assert_eq!(cache.stats().loads, 1, "no load of its own");
    assert_eq!(
        read(&cache, LoadOptions::new(), "unused")
            .await
            .expect("read"),
        "v2",
        "a read without the option waits for the lease holder's value"
    );
    assert_eq!(reloading.await.expect("join").expect("load"), "v2");

    // Beyond the bound: the read waits as usual.
    let short = || LoadOptions::new().stale_while_revalidate(Duration::from_millis(200));
    assert_eq!(read(&cache, short(), "unused").await.expect("read"), "v2");
    cache.invalidate(["note:1"]).await.expect("invalidate");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reloading = slow_load(&other, "v3", Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(read(&cache, short(), "unused").await.expect("read"), "v3");
    assert_eq!(
        cache.stats().stale_served,
        1,
        "nothing older than the bound"
    );
    reloading.await.expect("join").expect("load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_on_error_covers_a_failing_loader_only_within_its_bound() {
    let prefix = TestPrefix::create("soe").await;
    let cache = cache(&prefix).await;
    let options = || LoadOptions::new().stale_on_error(Duration::from_millis(500));
    assert_eq!(read(&cache, options(), "v1").await.expect("read"), "v1");
    cache.invalidate(["note:1"]).await.expect("invalidate");
    let failing = |options: LoadOptions| {
        let cache = cache.clone();
        async move {
            cache
                .get_or_load_with(key!("note:<id>", id = 1), options, || async {
                    Err::<String, _>(std::io::Error::other("database down"))
                })
                .await
        }
    };
    assert_eq!(failing(options()).await.expect("the last value"), "v1");
    assert_eq!(cache.stats().stale_served, 1);
    assert!(
        failing(LoadOptions::new()).await.is_err(),
        "without the option, the error"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        failing(options()).await.is_err(),
        "beyond the bound, the error"
    );
    assert_eq!(cache.stats().stale_served, 1);
}
