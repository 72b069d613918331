//! A pool's caches share the pool's circuit breaker and read gate: the builder it hands out has no breaker
//! setting (which it could only ignore).
use cache_runtime::health::BreakerConfig;
use cache_runtime::{Cache, CachedPool};

fn other_cache(pool: &CachedPool) -> Cache {
    pool.cache_builder().breaker(BreakerConfig::default()).build()
}

fn main() {}
