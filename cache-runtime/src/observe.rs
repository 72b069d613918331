//! Metrics, through the [`metrics`] facade: install any recorder (e.g. a Prometheus exporter) in the
//! application and these series appear; without one they cost an atomic load.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `cache_hits_total` | counter | | reads answered by a valid store entry |
//! | `cache_misses_total` | counter | | reads that found no valid entry (then load, or wait for a lease) |
//! | `cache_loads_total` | counter | | loader calls |
//! | `cache_lease_waits_total` | counter | | reads that found another reader's lease and waited |
//! | `cache_fills_rejected_total` | counter | | loaded values not stored because the key was invalidated during the load (stale stores refused) |
//! | `cache_bypassed_reads_total` | counter | `reason` = `breaker` \| `gate` | reads that skipped the store (breaker open, or the post-outage gate closed) and went to the loader |
//! | `cache_store_errors_total` | counter | `op` | failed store operations (`peek`, `lookup`, `tags`, `fill`, `invalidate`, `sequence`, `reset`, `forgot`) |
//! | `cache_store_resets_total` | counter | `how` | times the store was found to have forgotten acknowledged invalidations (its sequence went back) and was repaired: `replayed` (the replay window's keys sent again) or `dropped` (every namespace of the registry, when the window did not reach back far enough) |
//! | `cache_replay_window_deliveries` | gauge | | deliveries held in the replay window (see `RelayConfig::replay_window`) |
//! | `cache_replica_loads_total` | counter | `on` = `replica` \| `primary` | loads of `get_or_load_on_replica`: on the read replica (caught up with the lease), or on the primary (the replica lagged more than `replica_wait`) |
//! | `cache_breaker_state` | gauge | | 0 closed, 1 half-open (probing), 2 open |
//! | `cache_gate_closed` | gauge | | 1 while reads bypass the cache after a store failure, until the outbox rows of the outage are delivered |
//! | `cache_invalidations_sent_total` | counter | `path` = `commit` \| `relay` \| `lapsed` \| `replayed` \| `dropped` | keys invalidated in the store (the last two: repairs of a store that forgot) |
//! | `cache_invalidation_failures_total` | counter | `path` | invalidations that failed or were skipped (breaker open); the rows stay in the outbox |
//! | `cache_relay_rows_total` | counter | | outbox rows delivered by a relay |
//! | `cache_relay_batches_total` | counter | | relay batches (one claim, one store pipeline, one delete) |
//! | `cache_relay_lag_seconds` | histogram | | per relay batch: age of its oldest row when delivered (commit → invalidation for writes the relay delivers) |
//! | `cache_outbox_depth` | gauge | | outbox rows the relay's consumer has not delivered, measured by the relay when idle |
//! | `cache_outbox_oldest_age_seconds` | gauge | | age of the oldest of those rows |
//! | `cache_outbox_rows` | gauge | | every outbox row, including those other consumers still need (a consumer that is gone holds rows back until its expiry) |
//! | `cache_tier_reads_total` | counter | `tier` = `l1` \| `l2` | peeks of a `TieredStore` answered by its in-process tier, or sent to Redis |
//! | `cache_tier_invalidations_total` | counter | | keys a `TieredStore` invalidated (removed from its tier before and after Redis) |
//! | `cache_fanout_connected` | gauge | | 1 while a `TieredStore` is subscribed to the invalidation channel |
//! | `cache_outbox_consumers` | gauge | | live consumers of the outbox (see [`Consumer`](crate::outbox::Consumer)) |
//!
//! Every series is process-wide (several caches or relays in one process add up).

use metrics::{counter, gauge, histogram};

pub(crate) fn hit() {
    counter!("cache_hits_total").increment(1);
}

pub(crate) fn miss() {
    counter!("cache_misses_total").increment(1);
}

pub(crate) fn load() {
    counter!("cache_loads_total").increment(1);
}

pub(crate) fn lease_wait() {
    counter!("cache_lease_waits_total").increment(1);
}

pub(crate) fn fill_rejected() {
    counter!("cache_fills_rejected_total").increment(1);
}

pub(crate) fn bypassed(reason: &'static str) {
    counter!("cache_bypassed_reads_total", "reason" => reason).increment(1);
}

pub(crate) fn store_error(op: &'static str) {
    counter!("cache_store_errors_total", "op" => op).increment(1);
}

pub(crate) fn store_reset(how: &'static str) {
    counter!("cache_store_resets_total", "how" => how).increment(1);
}

pub(crate) fn replay_window(deliveries: u64) {
    gauge!("cache_replay_window_deliveries").set(deliveries as f64);
}

pub(crate) fn replica_load(on: &'static str) {
    counter!("cache_replica_loads_total", "on" => on).increment(1);
}

pub(crate) fn breaker_state(state: u8) {
    gauge!("cache_breaker_state").set(f64::from(state));
}

pub(crate) fn gate_closed(closed: bool) {
    gauge!("cache_gate_closed").set(if closed { 1.0 } else { 0.0 });
}

pub(crate) fn invalidations_sent(path: &'static str, keys: usize) {
    counter!("cache_invalidations_sent_total", "path" => path).increment(keys as u64);
}

pub(crate) fn invalidation_failed(path: &'static str) {
    counter!("cache_invalidation_failures_total", "path" => path).increment(1);
}

pub(crate) fn relay_batch(rows: usize, oldest_age_seconds: f64) {
    counter!("cache_relay_batches_total").increment(1);
    counter!("cache_relay_rows_total").increment(rows as u64);
    histogram!("cache_relay_lag_seconds").record(oldest_age_seconds);
}

pub(crate) fn backlog(depth: u64, oldest_age_seconds: f64, total: u64, consumers: u32) {
    gauge!("cache_outbox_depth").set(depth as f64);
    gauge!("cache_outbox_oldest_age_seconds").set(oldest_age_seconds);
    gauge!("cache_outbox_rows").set(total as f64);
    gauge!("cache_outbox_consumers").set(f64::from(consumers));
}

pub(crate) fn tier_hit(tier: &'static str) {
    counter!("cache_tier_reads_total", "tier" => tier).increment(1);
}

pub(crate) fn tier_invalidated(keys: usize) {
    counter!("cache_tier_invalidations_total").increment(keys as u64);
}

pub(crate) fn fanout_connected(connected: bool) {
    gauge!("cache_fanout_connected").set(if connected { 1.0 } else { 0.0 });
}
