//! Consumers: the stores one database's outbox is delivered to (see [`Consumer`]).

use std::time::Duration;

use crate::registry::fnv1a64;

/// A store the outbox is delivered to, as the database knows it: a name and the tag stored in outbox rows
/// (a hash of the name).
///
/// Every pool and relay delivers the outbox to its store under the store's consumer name
/// ([`Store::consumer`](crate::Store::consumer), or [`CachedPoolOptions::consumer`](crate::CachedPoolOptions::consumer) /
/// [`RelayBuilder::consumer`](crate::outbox::RelayBuilder::consumer)). On PostgreSQL:
///
/// - **Every live consumer receives every row.** Processes with the same consumer share the work (each row
///   is delivered by one of them); two services with different Redis servers or prefixes, or processes with
///   in-process stores, are different consumers and each gets every row: a write through one service's pool
///   reaches the other's store through that service's relay (the writer's delete, some 50 ms after its
///   `COMMIT`, wakes the relays).
/// - **A row is deleted once every live consumer delivered it.** A consumer is live while one of its
///   processes (pools, relays) is: registered at connect (a relay: when it starts), again at every heartbeat
///   (a quarter of [`RelayConfig::consumer_expiry`](crate::outbox::RelayConfig::consumer_expiry), at most a minute),
///   until [`CachedPool::close`](crate::CachedPool::close) or drop, or for the expiry after its last
///   heartbeat (a crash). So a consumer that is gone holds rows back for at most its expiry (default 5
///   minutes). The relay's gauges show it: `cache_outbox_rows` (every row) against `cache_outbox_depth` (the
///   rows this consumer has not delivered), and `cache_outbox_consumers` (live consumers).
/// - **A consumer that missed rows drops its namespaces.** When rows are deleted while a known consumer is
///   not live, the consumer is marked; its next registration (a process starting again, or a heartbeat after
///   a stall longer than the expiry) drops every namespace of the registry from its store (the entities'
///   shapes, as a `TRUNCATE` does) before its reads use the cache again (on a store failure, the read gate
///   stays closed until that is done).
///
/// SQLite has one consumer (the rows are deleted by the process that delivered them).
///
/// # Examples
///
/// ```
/// use cache_runtime::outbox::Consumer;
///
/// let consumer = Consumer::new("shop-eu redis");
/// assert_eq!(consumer.name(), "shop-eu redis");
/// assert_eq!(consumer.tag().len(), 16);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    name: String,
    tag: String,
}

impl Consumer {
    /// The consumer named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        let tag = format!("{:016x}", fnv1a64(name.as_bytes()));
        Self { name, tag }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tag as a number (what a [`WriteToken`](crate::token::WriteToken) records).
    pub(crate) fn id(&self) -> u64 {
        fnv1a64(self.name.as_bytes())
    }

    /// The tag stored in outbox rows and sent as the wrapped sessions' marker: 16 hexadecimal digits.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

/// Time between two registrations of a consumer whose expiry is `expiry`: a quarter of it, at most a
/// minute, at least 100 ms.
pub(crate) fn heartbeat_interval(expiry: Duration) -> Duration {
    (expiry / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}
