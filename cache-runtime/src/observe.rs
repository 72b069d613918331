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
//! | `cache_bypassed_reads_total` | counter | `reason` = `breaker` \| `gate` \| `token` | reads that skipped the store (breaker open, the post-outage gate closed, or a [write token](crate::token) not delivered within `token_wait`) and went to the loader |
//! | `cache_consistency_samples_total` | counter | | hits checked against the database by the consistency sampler ([`Sampling`](crate::cache::Sampling)) |
//! | `cache_consistency_inconsistent_total` | counter | | checked hits whose entry still differed from an unchanged row Δ after the first check |
//! | `cache_consistency_dropped_total` | counter | | samples dropped (queue full, or a check's read failed) |
//! | `cache_consistency_delay_seconds` | gauge | | Δ of the sampler |
//! | `cache_refreshes_total` | counter | `outcome` = `started` \| `skipped` | reloads of hot keys after their invalidation (see [`refresh`](crate::refresh)); `skipped`: too many running |
//! | `cache_stale_served_total` | counter | `reason` = `revalidating` \| `loader_error` | reads that returned a value seen valid within their explicit bound (`LoadOptions::stale_while_revalidate` / `stale_on_error`) |
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
//! | `cache_invalidation_lag_seconds` | histogram | `path` = `commit` \| `relay` | commit → invalidation acknowledged by the store: `commit`, from the `COMMIT`'s answer to the store's, per delivery of a writer through the pool; `relay`, per relay batch, the age of its oldest row when delivered (writes of other clients, and those the writer could not deliver) |
//! | `cache_outbox_depth` | gauge | | outbox rows the relay's consumer has not delivered, measured by the relay when idle |
//! | `cache_outbox_oldest_age_seconds` | gauge | | age of the oldest of those rows |
//! | `cache_outbox_rows` | gauge | | every outbox row, including those other consumers still need (a consumer that is gone holds rows back until its expiry) |
//! | `cache_tier_reads_total` | counter | `tier` = `l1` \| `l2` | peeks of a `TieredStore` answered by its in-process tier, or sent to Redis |
//! | `cache_tier_invalidations_total` | counter | | keys a `TieredStore` invalidated (removed from its tier before and after Redis) |
//! | `cache_fanout_connected` | gauge | | 1 while a `TieredStore` is subscribed to the invalidation channel |
//! | `cache_outbox_consumers` | gauge | | live consumers of the outbox (see [`Consumer`](crate::outbox::Consumer)) |
//!
//! Every series is process-wide (several caches or relays in one process add up).
//!
//! # Names
//!
//! The names above have the default prefix [`DEFAULT_PREFIX`] (`cache`); a service whose own metrics
//! already use `cache_…`, or that runs two libraries of this kind, sets another with [`set_prefix`] before
//! the first pool or cache is built (`set_prefix("catalog_cache")` gives `catalog_cache_hits_total`).
//! Counters end in `_total`, durations are in seconds (`_seconds`), as Prometheus' naming conventions ask.
//! [`describe`] hands every series' kind, unit and help text to the installed recorder (for `# HELP`
//! lines); call it once after installing the recorder.
//!
//! # Traces
//!
//! The spans `cache.commit`, `cache.relay_batch` and `cache.invalidate` (level `DEBUG`) carry
//! OpenTelemetry's database attributes: `db.system.name` (`postgresql`, `sqlite`; on `cache.invalidate`
//! the store's, `redis`, see [`Store::system_name`](crate::Store::system_name)) and `db.operation.name`
//! (`COMMIT`, `UNLINK`). `cache.load` (a loader's call, which may not touch a database) carries the key.
//!
//! # Consistency as "N nines within Δ"
//!
//! The fraction of sampled hits that were consistent within Δ, and its nines (PromQL):
//!
//! ```text
//! 1 - rate(cache_consistency_inconsistent_total[1h]) / rate(cache_consistency_samples_total[1h])
//! -log10(rate(cache_consistency_inconsistent_total[1h]) / rate(cache_consistency_samples_total[1h]))
//! ```
//!
//! (the second is `+Inf` while nothing was inconsistent; alert on `increase(cache_consistency_inconsistent_total[5m]) > 0`
//! for a cache that must never be stale). Invalidation lag: `histogram_quantile(0.99,
//! rate(cache_invalidation_lag_seconds_bucket[5m]))` by `path` (`commit` for writers, `relay` for the
//! relay), and `cache_outbox_oldest_age_seconds` for what is still waiting.

use std::sync::OnceLock;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

/// The prefix of every metric name unless [`set_prefix`] chose another.
pub const DEFAULT_PREFIX: &str = "cache";

static PREFIX: OnceLock<String> = OnceLock::new();
static NAMES: OnceLock<Names> = OnceLock::new();

/// Why [`set_prefix`] refused a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrefixError {
    /// Not a Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    #[error(
        "metric prefix {0:?} is not a Prometheus name: use letters, digits, `_` and `:`, not first a digit"
    )]
    Invalid(String),
    /// The prefix was set before, or a metric was already recorded under it.
    #[error(
        "the metric prefix is already {0:?} (set before, or fixed by the first metric recorded): call \
         `observe::set_prefix` once, before building any pool or cache"
    )]
    AlreadySet(String),
}

/// Sets the prefix of every metric name of this crate (default [`DEFAULT_PREFIX`]), for the whole
/// process.
///
/// # Errors
///
/// [`PrefixError::Invalid`] when `prefix` is not a Prometheus name; [`PrefixError::AlreadySet`] when a
/// prefix was set before or a metric was already recorded (the names are built once, at the first metric).
pub fn set_prefix(prefix: &str) -> Result<(), PrefixError> {
    let mut chars = prefix.chars();
    let valid_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if !valid_first || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return Err(PrefixError::Invalid(prefix.to_owned()));
    }
    PREFIX
        .set(prefix.to_owned())
        .map_err(|_| PrefixError::AlreadySet(self::prefix().to_owned()))
}

/// The prefix of every metric name: the one [`set_prefix`] chose, else [`DEFAULT_PREFIX`] (fixed from
/// then on).
pub fn prefix() -> &'static str {
    PREFIX.get_or_init(|| DEFAULT_PREFIX.to_owned())
}

/// Declares the metric series of this crate: their names (built once from the prefix) and, for
/// [`describe`], their kind, unit and help text.
macro_rules! series {
    ($($field:ident: $kind:ident $unit:ident $help:literal;)*) => {
        /// Every metric name, with the prefix; built once, at the first metric.
        struct Names {
            $($field: &'static str,)*
        }

        impl Names {
            fn new(prefix: &str) -> Self {
                // Built once per process, so a handful of leaked strings: `&'static str` names make every
                // metric call allocation-free.
                Self {
                    $($field: Box::leak(format!("{prefix}_{}", stringify!($field)).into_boxed_str()),)*
                }
            }
        }

        /// Hands the kind, unit and help text of every series of this crate to the installed recorder (for
        /// `# HELP` lines and units in the exposition). Call it once, after installing the recorder.
        pub fn describe() {
            let names = names();
            $(series!(@describe $kind, names.$field, $unit, $help);)*
        }
    };
    (@describe counter, $name:expr, $unit:ident, $help:literal) => {
        describe_counter!($name, Unit::$unit, $help)
    };
    (@describe gauge, $name:expr, $unit:ident, $help:literal) => {
        describe_gauge!($name, Unit::$unit, $help)
    };
    (@describe histogram, $name:expr, $unit:ident, $help:literal) => {
        describe_histogram!($name, Unit::$unit, $help)
    };
}

series! {
    hits_total: counter Count "Reads answered by a valid store entry.";
    misses_total: counter Count "Reads that found no valid entry.";
    loads_total: counter Count "Loader calls.";
    lease_waits_total: counter Count "Reads that found another reader's lease and waited.";
    fills_rejected_total: counter Count "Loaded values not stored because the key was invalidated during the load.";
    bypassed_reads_total: counter Count "Reads that skipped the store (breaker open, or post-outage gate closed).";
    store_errors_total: counter Count "Failed store operations, by operation.";
    store_resets_total: counter Count "Repairs of a store that forgot acknowledged invalidations.";
    replay_window_deliveries: gauge Count "Deliveries held in the replay window.";
    replica_loads_total: counter Count "Loads of get_or_load_on_replica, on the replica or the primary.";
    breaker_state: gauge Count "Store circuit breaker: 0 closed, 1 half-open, 2 open.";
    gate_closed: gauge Count "1 while reads bypass the cache until the outage's outbox rows are delivered.";
    invalidations_sent_total: counter Count "Keys invalidated in the store, by path.";
    invalidation_failures_total: counter Count "Invalidations that failed or were skipped; the rows stay in the outbox.";
    invalidation_lag_seconds: histogram Seconds "Commit to invalidation acknowledged by the store, by path.";
    consistency_samples_total: counter Count "Hits checked against the database by the consistency sampler.";
    consistency_inconsistent_total: counter Count "Checked hits whose entry still differed from an unchanged row after the delay.";
    consistency_dropped_total: counter Count "Consistency samples dropped (queue full, or a check's read failed).";
    consistency_delay_seconds: gauge Seconds "The consistency sampler's delay.";
    refreshes_total: counter Count "Reloads of hot keys after their invalidation, by outcome.";
    stale_served_total: counter Count "Reads that returned a value seen valid within their explicit bound, by reason.";
    tier_reads_total: counter Count "Peeks of a TieredStore, by the tier that answered (l1 in process, l2 Redis).";
    tier_invalidations_total: counter Count "Keys a TieredStore removed from its in-process tier.";
    fanout_connected: gauge Count "1 while a TieredStore is subscribed to the invalidation channel.";
    relay_rows_total: counter Count "Outbox rows delivered by a relay.";
    relay_batches_total: counter Count "Relay batches.";
    outbox_depth: gauge Count "Outbox rows this relay's consumer has not delivered.";
    outbox_oldest_age_seconds: gauge Seconds "Age of the oldest undelivered outbox row.";
    outbox_rows: gauge Count "Every outbox row, including those other consumers still need.";
    outbox_consumers: gauge Count "Live consumers of the outbox.";
}

fn names() -> &'static Names {
    NAMES.get_or_init(|| Names::new(prefix()))
}

pub(crate) fn hit() {
    counter!(names().hits_total).increment(1);
}

pub(crate) fn miss() {
    counter!(names().misses_total).increment(1);
}

pub(crate) fn load() {
    counter!(names().loads_total).increment(1);
}

pub(crate) fn lease_wait() {
    counter!(names().lease_waits_total).increment(1);
}

pub(crate) fn fill_rejected() {
    counter!(names().fills_rejected_total).increment(1);
}

pub(crate) fn bypassed(reason: &'static str) {
    counter!(names().bypassed_reads_total, "reason" => reason).increment(1);
}

pub(crate) fn store_error(op: &'static str) {
    counter!(names().store_errors_total, "op" => op).increment(1);
}

pub(crate) fn store_reset(how: &'static str) {
    counter!(names().store_resets_total, "how" => how).increment(1);
}

pub(crate) fn replay_window(deliveries: u64) {
    gauge!(names().replay_window_deliveries).set(deliveries as f64);
}

pub(crate) fn replica_load(on: &'static str) {
    counter!(names().replica_loads_total, "on" => on).increment(1);
}

pub(crate) fn breaker_state(state: u8) {
    gauge!(names().breaker_state).set(f64::from(state));
}

pub(crate) fn gate_closed(closed: bool) {
    gauge!(names().gate_closed).set(if closed { 1.0 } else { 0.0 });
}

pub(crate) fn invalidations_sent(path: &'static str, keys: usize) {
    counter!(names().invalidations_sent_total, "path" => path).increment(keys as u64);
}

pub(crate) fn invalidation_failed(path: &'static str) {
    counter!(names().invalidation_failures_total, "path" => path).increment(1);
}

pub(crate) fn relay_batch(rows: usize, oldest_age_seconds: f64) {
    counter!(names().relay_batches_total).increment(1);
    counter!(names().relay_rows_total).increment(rows as u64);
    invalidation_lag("relay", oldest_age_seconds);
}

pub(crate) fn invalidation_lag(path: &'static str, seconds: f64) {
    histogram!(names().invalidation_lag_seconds, "path" => path).record(seconds);
}

pub(crate) fn backlog(depth: u64, oldest_age_seconds: f64, total: u64, consumers: u32) {
    gauge!(names().outbox_depth).set(depth as f64);
    gauge!(names().outbox_oldest_age_seconds).set(oldest_age_seconds);
    gauge!(names().outbox_rows).set(total as f64);
    gauge!(names().outbox_consumers).set(f64::from(consumers));
}

pub(crate) fn consistency_sample() {
    counter!(names().consistency_samples_total).increment(1);
}

pub(crate) fn consistency_inconsistent() {
    counter!(names().consistency_inconsistent_total).increment(1);
}

pub(crate) fn consistency_dropped() {
    counter!(names().consistency_dropped_total).increment(1);
}

/// A sampler started with delay Δ = `seconds`: the gauge, and the counters registered at their value (so
/// a dashboard shows 0 inconsistencies rather than no series).
pub(crate) fn consistency_sampler(seconds: f64) {
    gauge!(names().consistency_delay_seconds).set(seconds);
    counter!(names().consistency_samples_total).increment(0);
    counter!(names().consistency_inconsistent_total).increment(0);
    counter!(names().consistency_dropped_total).increment(0);
}

pub(crate) fn refresh(outcome: &'static str) {
    counter!(names().refreshes_total, "outcome" => outcome).increment(1);
}

pub(crate) fn stale_served(reason: &'static str) {
    counter!(names().stale_served_total, "reason" => reason).increment(1);
}

pub(crate) fn tier_hit(tier: &'static str) {
    counter!(names().tier_reads_total, "tier" => tier).increment(1);
}

pub(crate) fn tier_invalidated(keys: usize) {
    counter!(names().tier_invalidations_total).increment(keys as u64);
}

pub(crate) fn fanout_connected(connected: bool) {
    gauge!(names().fanout_connected).set(if connected { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_must_be_a_prometheus_name_and_is_set_once() {
        for bad in ["", "1cache", "my-cache", "cache name", "cafe\u{e9}"] {
            assert_eq!(set_prefix(bad), Err(PrefixError::Invalid(bad.to_owned())));
        }
        // Another test may have recorded a metric first (fixing the default): either way, the second call
        // is refused and names the prefix in force.
        let _ = set_prefix("unit_test:cache");
        let again = set_prefix("other");
        assert_eq!(again, Err(PrefixError::AlreadySet(prefix().to_owned())));
        assert!(names().hits_total.starts_with(prefix()));
        assert!(names().hits_total.ends_with("_hits_total"));
    }
}
