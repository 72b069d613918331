//! Read-your-writes tokens: a write's commit position, handed to a read in another process (or another
//! request) so that it never returns a value older than that write.
//!
//! # What a token says
//!
//! A [`WriteToken`] names a write by its **outbox position** (the highest outbox row id of the write: the
//! capture triggers wrote its keys there in the writing transaction) and says whether the writer's store
//! acknowledged the invalidation before the write returned, and which [consumer](crate::outbox::Consumer)
//! that store is.
//!
//! A read given a token ([`LoadOptions::after`](crate::LoadOptions::after),
//! [`Cache::get_or_load_after`](crate::Cache::get_or_load_after), or the task's token set by
//! [`scope`]) first makes sure that its own store received the write's invalidation:
//!
//! 1. **Acknowledged by this store**: the token was delivered to the same consumer (the same Redis server
//!    and prefix). The invalidation happened before the token existed, so the read proceeds as usual.
//! 2. **Not known delivered** (the writer's store failed, another consumer, the delivery still in
//!    flight): the read asks the database whether this cache's consumer has delivered every outbox row up
//!    to the token's position, polling (1 ms doubling to 50 ms) up to
//!    [`token_wait`](crate::cache::CacheBuilder::token_wait) (default 1 s).
//! 3. **Still not delivered**, or a cache with no database (built by [`Cache::builder`](crate::Cache::builder)):
//!    the read **bypasses the cache**: it runs its loader (on the primary) and stores nothing
//!    (`cache_bypassed_reads_total{reason="token"}`).
//!
//! A token from a write that changed no captured row has position 0 and is always satisfied.
//!
//! The load itself follows the usual snapshot rules: [`CachedPool::get`](crate::CachedPool::get) and
//! [`get_or_load_on_replica`](crate::CachedPool::get_or_load_on_replica) load on a read replica only once
//! it replayed the primary's WAL position read after the call, which is past the token's commit; custom
//! loaders must read a snapshot taken after the call, as always.
//!
//! Tokens are not authenticated: one forged by a client can cost its own reads at most the bounded wait and
//! a load from the database (as a miss does), and never changes what other reads see.
//!
//! # Carrying tokens
//!
//! [`scope`] runs a future with a token for its reads and collects the newest token of its writes: every
//! write through a [`CachedPool`](crate::CachedPool) in the scope (autocommit statements and
//! [`CachedTransaction::commit`](crate::CachedTransaction::commit)) records its token there. The tower
//! layer ([`layer`](crate::layer), feature `tower`) does this per HTTP request, with the token in a header
//! or cookie. [`CachedTransaction::commit_with_token`](crate::CachedTransaction::commit_with_token) returns
//! the token of one transaction directly.
//!
//! # Limits
//!
//! An autocommit statement whose outbox rows could not be read after it (a broken connection) records no
//! token; the relay delivers its keys after the grace period. A read-looking statement that writes
//! through a function (see [`WriteDetection`](crate::WriteDetection)) records none either.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// The commit position of a write, and whether its invalidation was acknowledged by the writer's store.
///
/// Serializes ([`Display`](fmt::Display) / [`FromStr`]) to a compact string of `[0-9a-z.]`, safe in HTTP
/// headers and cookies, e.g. `w1.3f.9b3c0d6e2f417a58.d`.
///
/// # Examples
///
/// ```
/// use cache_runtime::token::WriteToken;
///
/// let token: WriteToken = "w1.3f.9b3c0d6e2f417a58.d".parse()?;
/// assert_eq!(token.position(), 0x3f);
/// assert!(token.acknowledged());
/// assert_eq!(token.to_string().parse::<WriteToken>()?, token);
/// # Ok::<(), cache_runtime::token::TokenError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriteToken {
    position: i64,
    consumer: u64,
    acknowledged: bool,
}

/// A string that is not a [`WriteToken`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a cache write token: {0:?} (expected `w1.<position>.<consumer>.<d|p>`, as written by \
     `WriteToken`'s Display; drop the header or cookie if it came from another version)"
)]
pub struct TokenError(String);

impl WriteToken {
    /// The token of a write that changed no captured row: always satisfied.
    pub const NONE: Self = Self {
        position: 0,
        consumer: 0,
        acknowledged: true,
    };

    /// A token for the outbox position `position`, delivered (`acknowledged`) or not to the store of the
    /// consumer `consumer` (its [`Consumer`](crate::outbox::Consumer) id).
    pub(crate) fn new(position: i64, consumer: u64, acknowledged: bool) -> Self {
        Self {
            position,
            consumer,
            acknowledged,
        }
    }

    /// The highest outbox row id of the write (0: no captured row).
    pub fn position(&self) -> i64 {
        self.position
    }

    /// Whether the writer's store acknowledged the invalidation before the write returned.
    pub fn acknowledged(&self) -> bool {
        self.acknowledged
    }

    /// The newer of two tokens (the one with the higher position); equal positions keep an unacknowledged
    /// one, which is the stricter.
    #[must_use]
    pub fn newest(self, other: Self) -> Self {
        match self.position.cmp(&other.position) {
            std::cmp::Ordering::Less => other,
            std::cmp::Ordering::Greater => self,
            std::cmp::Ordering::Equal if !other.acknowledged => other,
            std::cmp::Ordering::Equal => self,
        }
    }

    /// Whether a read on the store of consumer `consumer` may use the cache without asking the database:
    /// no captured row, or acknowledged by that very store.
    pub(crate) fn delivered_to(&self, consumer: u64) -> bool {
        self.position == 0 || (self.acknowledged && self.consumer == consumer)
    }
}

impl fmt::Display for WriteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.acknowledged { 'd' } else { 'p' };
        write!(f, "w1.{:x}.{:016x}.{state}", self.position, self.consumer)
    }
}

impl FromStr for WriteToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        let bad = || TokenError(s.chars().take(64).collect());
        let mut parts = s.trim().split('.');
        if parts.next() != Some("w1") {
            return Err(bad());
        }
        let mut hex = || parts.next().and_then(|p| u64::from_str_radix(p, 16).ok());
        let (position, consumer) = (hex(), hex());
        let acknowledged = match parts.next() {
            Some("d") => true,
            Some("p") => false,
            _ => return Err(bad()),
        };
        match (position, consumer, parts.next()) {
            (Some(position), Some(consumer), None) => Ok(Self {
                position: i64::try_from(position).map_err(|_| bad())?,
                consumer,
                acknowledged,
            }),
            _ => Err(bad()),
        }
    }
}

impl serde::Serialize for WriteToken {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for WriteToken {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a cache asks whether a write was delivered to its store: a pool's outbox.
pub(crate) trait Positions: Send + Sync {
    /// The id of the consumer the cache's store is ([`Consumer`](crate::outbox::Consumer)).
    fn consumer(&self) -> u64;

    /// Whether this consumer delivered every outbox row up to `position`.
    fn delivered(
        &self,
        position: i64,
    ) -> futures_core::future::BoxFuture<'_, Result<bool, crate::error::Error>>;
}

/// The tokens of one [`scope`]: the one its reads honor, and the newest of its writes.
#[derive(Debug, Default)]
pub(crate) struct Scope {
    read: Option<WriteToken>,
    written: Mutex<Option<WriteToken>>,
}

impl Scope {
    /// Records the token of a write made in this scope (the newest is kept).
    pub(crate) fn record(&self, token: WriteToken) {
        if let Ok(mut written) = self.written.lock() {
            *written = Some(written.map_or(token, |w| w.newest(token)));
        }
    }

    fn written(&self) -> Option<WriteToken> {
        self.written.lock().ok().and_then(|w| *w)
    }
}

tokio::task_local! {
    static SCOPE: Arc<Scope>;
}

/// Runs `future` with `read` as the token of its reads (every read through a [`Cache`](crate::Cache)
/// in it that is given no token of its own honors it), and returns its output with the newest token of
/// the writes it made through a [`CachedPool`](crate::CachedPool) (`None` when it wrote no captured row).
///
/// A task spawned inside the scope is outside it (tokio task-locals do not cross `spawn`).
///
/// # Examples
///
/// ```no_run
/// # async fn f(pool: cache_runtime::CachedPgPool) -> Result<(), sqlx::Error> {
/// use cache_runtime::token;
///
/// let (result, written) = token::scope(None, async {
///     sqlx::query("UPDATE products SET price_cents = 900 WHERE id = 7").execute(&pool).await
/// })
/// .await;
/// result?;
/// let header = written.map(|t| t.to_string()); // send it to the client, or to the next service
/// # Ok(()) }
/// ```
pub async fn scope<F: Future>(
    read: Option<WriteToken>,
    future: F,
) -> (F::Output, Option<WriteToken>) {
    let scope = Arc::new(Scope {
        read,
        written: Mutex::new(None),
    });
    let output = SCOPE.scope(Arc::clone(&scope), future).await;
    (output, scope.written())
}

/// The token the reads of the current task honor (set by [`scope`]), if any.
pub fn current() -> Option<WriteToken> {
    SCOPE.try_with(|scope| scope.read).ok().flatten()
}

/// The scope of the current task, for a write to record its token in (taken before a spawn).
pub(crate) fn sink() -> Option<Arc<Scope>> {
    SCOPE.try_with(Arc::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let token = WriteToken::new(i64::MAX, u64::MAX, false);
        let text = token.to_string();
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'));
        assert_eq!(text.parse::<WriteToken>(), Ok(token));
        for bad in [
            "",
            "w1",
            "w2.1.1.d",
            "w1.1.1.x",
            "w1.1.1.d.9",
            "w1.zz.1.d",
            "w1.ffffffffffffffff.0.d",
        ] {
            assert!(bad.parse::<WriteToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_newest_token_wins_and_unacknowledged_is_stricter() {
        let old = WriteToken::new(5, 9, true);
        let new = WriteToken::new(8, 9, true);
        assert_eq!(old.newest(new), new);
        assert_eq!(new.newest(old), new);
        let pending = WriteToken::new(8, 9, false);
        assert_eq!(new.newest(pending), pending);
        assert!(new.delivered_to(9) && !new.delivered_to(10) && !pending.delivered_to(9));
        assert!(WriteToken::NONE.delivered_to(1));
    }

    #[tokio::test]
    async fn a_scope_collects_the_newest_write_and_exposes_its_read_token() {
        let read = WriteToken::new(3, 1, true);
        let ((), written) = scope(Some(read), async {
            assert_eq!(current(), Some(read));
            let sink = sink().expect("inside a scope");
            sink.record(WriteToken::new(4, 1, true));
            sink.record(WriteToken::new(2, 1, true));
        })
        .await;
        assert_eq!(written.map(|w| w.position()), Some(4));
        assert_eq!(current(), None);
    }
}
