//! The Redis store.
//!
//! Layout, under the store's prefix: the value slot of key `K` is `prefix + K` (an entry, or a lease
//! `"\0L" + token`); the tag token of `K` is `prefix + "<tag>" + K`, and that of a shape `S` is
//! `prefix + "<tag>" + S`; `prefix + "<consumer>"` holds the id that names the prefix's data as an outbox
//! consumer ([`Store::consumer`](crate::Store::consumer)), and `prefix + "<sequence>"` the prefix's
//! [sequence](crate::Store::sequence) (`INCR` after every invalidation, read with every peek and lookup). Every script touches exactly one key; a lookup pipelines one script per key
//! (one round trip on a standalone server). A peek (the hit path) is one `MGET` of the value slot and its
//! tag tokens, so on a Redis Cluster those slots would need one hash slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, Pipeline, Script, ScriptInvocation, ServerErrorKind, Value};

#[cfg(feature = "cluster")]
pub(crate) mod cluster;

use super::tiered::fanout;
use super::{
    BoxFuture, LeaseRequest, Lookup, Peek, Slot, Store, StoreError, TagToken, is_shape, nonce,
    tag_slot,
};

/// The marker that starts a lease in a value slot. Entries start with a different byte.
pub(crate) const LEASE_MARK: &[u8] = b"\0L";

/// Reads the value slot; takes the lease when it is empty (or holds exactly ARGV[3] when ARGV[4] = '1').
/// Returns {1, value} | {2} (leased by another) | {3, seconds, microseconds} (lease taken).
const LOOKUP: &str = include_str!("redis/lookup.lua");

/// Returns the tag token, creating it (nonce ARGV[1] + '.' + server time in microseconds) when missing and
/// ARGV[2] > 0; makes it live at least ARGV[2] ms.
const TAG: &str = include_str!("redis/tag.lua");

/// Stores ARGV[2] for ARGV[3] ms if the slot still holds the lease ARGV[1].
const FILL: &str = include_str!("redis/fill.lua");

/// Deletes the slot if it still holds the lease ARGV[1].
const RELEASE: &str = include_str!("redis/release.lua");

/// Returns the sequence, first raised to ARGV[1] if it is lower.
const SEQUENCE: &str = include_str!("redis/sequence.lua");

#[derive(Debug)]
struct Scripts {
    lookup: Script,
    tag: Script,
    fill: Script,
    release: Script,
    sequence: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            lookup: Script::new(LOOKUP),
            tag: Script::new(TAG),
            fill: Script::new(FILL),
            release: Script::new(RELEASE),
            sequence: Script::new(SEQUENCE),
        }
    }

    fn all(&self) -> [&Script; 5] {
        [
            &self.lookup,
            &self.tag,
            &self.fill,
            &self.release,
            &self.sequence,
        ]
    }
}

/// A [`Store`] on Redis, through redis-rs' reconnecting [`ConnectionManager`].
///
/// Standalone servers; every atomic operation touches a single key, so a Cluster implementation can share
/// the scripts. On Redis 7.0 and later (found at connect), a miss takes its lease without a script
/// (`SET … NX GET`); older servers run the lookup script, with the same guarantees.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> Result<(), cache_runtime::StoreError> {
/// let store = cache_runtime::RedisStore::connect("redis://127.0.0.1:6379", "myapp:").await?;
/// let cache = cache_runtime::Cache::new(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: Connection,
    prefix: String,
    scripts: Arc<Scripts>,
    consumer: String,
    /// `WAIT` for this many replicas, this long, after each invalidation.
    wait: Option<(u64, Duration)>,
    /// The `CLIENT ID` of the accepted connection (0: none yet): a read answered on another one means the
    /// connection manager reconnected, maybe to another server or dataset, and fails until
    /// [`vouch`](Store::vouch) accepts the newest one seen.
    client: Arc<AtomicU64>,
    /// The newest `CLIENT ID` a read found (0: none), for [`vouch`](Store::vouch).
    newest: Arc<AtomicU64>,
    /// With a pool: the `CLIENT ID`s of the pooled connections seen so far.
    #[cfg(feature = "deadpool-redis")]
    pooled: Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
    /// Whether the server takes `SET … NX GET` and `PEXPIRE … GT` (Redis 7.0 and later): a lease is then
    /// taken without a script (see `lookup_native`). Cleared for good when the server answers that path
    /// with a plain `ERR` (a syntax error: a server replaced by an older one).
    native: Arc<AtomicBool>,
}

/// How the store reaches Redis.
#[derive(Clone)]
enum Connection {
    /// One multiplexed connection that reconnects on its own.
    Manager(ConnectionManager),
    /// The application's deadpool-redis pool: each call takes a connection.
    #[cfg(feature = "deadpool-redis")]
    Pool(deadpool_redis::Pool),
}

impl Connection {
    /// Runs `pipe` on a connection.
    async fn query<T: redis::FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, StoreError> {
        match self {
            Self::Manager(manager) => Ok(pipe.query_async(&mut manager.clone()).await?),
            #[cfg(feature = "deadpool-redis")]
            Self::Pool(pool) => {
                let mut conn = pool
                    .get()
                    .await
                    .map_err(|e| StoreError::Pool(e.to_string()))?;
                Ok(pipe.query_async(&mut conn).await?)
            }
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url`; every key this store touches starts with `prefix`.
    ///
    /// The connection reconnects on its own (failing fast: one retry after 10 ms; the circuit breaker of
    /// the [`Cache`](crate::Cache) or pool paces further attempts); a command waits at most 1 s for its
    /// answer, so that a hung server makes reads fall through to the database instead of hanging them.
    ///
    /// # Errors
    ///
    /// [`StoreError::Redis`] when the URL is invalid or the server cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the connection being set up; nothing is written.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        // Reconnect attempts fail fast (one retry after 10 ms): the circuit breaker in front of the store
        // paces the attempts of a process, not the connection manager.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Self::with_connection(conn, prefix).await
    }

    /// A store on an existing connection manager; every key this store touches starts with `prefix`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Redis`] when the scripts cannot be loaded.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the scripts loaded or not; they are loaded again on first use.
    pub async fn with_connection(
        conn: ConnectionManager,
        prefix: impl Into<String>,
    ) -> Result<Self, StoreError> {
        Self::on(Connection::Manager(conn), prefix.into()).await
    }

    /// A store on the application's deadpool-redis pool; every key this store touches starts with
    /// `prefix`. Each call takes a connection from the pool. A connection the store has not seen before
    /// counts, on its first read, as a reconnect: the pool checks the store (one recovery pass) before it
    /// serves from it, as after a reconnect of [`connect`](Self::connect)'s connection (the server behind a
    /// new connection may have restarted from an older snapshot). Needs the `deadpool-redis` feature.
    ///
    /// # Errors
    ///
    /// [`StoreError::Pool`] or [`StoreError::Redis`] when the scripts cannot be loaded.
    ///
    /// # Cancel safety
    ///
    /// As [`with_connection`](Self::with_connection).
    #[cfg(feature = "deadpool-redis")]
    pub async fn with_pool(
        pool: deadpool_redis::Pool,
        prefix: impl Into<String>,
    ) -> Result<Self, StoreError> {
        Self::on(Connection::Pool(pool), prefix.into()).await
    }

    async fn on(conn: Connection, prefix: String) -> Result<Self, StoreError> {
        let mut store = Self {
            conn,
            prefix,
            scripts: Arc::new(Scripts::new()),
            consumer: String::new(),
            wait: None,
            client: Arc::new(AtomicU64::new(0)),
            newest: Arc::new(AtomicU64::new(0)),
            #[cfg(feature = "deadpool-redis")]
            pooled: Arc::default(),
            native: Arc::default(),
        };
        store.load_scripts().await?;
        store.consumer = store.dataset_id().await?;
        store.native = Arc::new(AtomicBool::new(store.takes_native_lease().await?));
        Ok(store)
    }

    /// [`Store::lookup`] without a script (Redis 7.0 and later), when no invalid entry is to be replaced:
    /// `TIME`, then `SET … NX PX … GET` (the old value, or nil when this lease was set), each tag's `GET` and
    /// `PEXPIRE … GT` (it lives at least `tag_ttl`), the sequence and `CLIENT ID`, in one round trip. A
    /// script costs the server several times what these commands do (3 per miss were most of a miss's
    /// extra cost over `GET` + `SET`). `TIME` comes first, so the lease's recorded start is never later
    /// than the lease: a tag created in between counts as created after it (the fill is refused, never a
    /// stale one stored). A missing tag (the first read of a namespace, or after a `TRUNCATE`) is created
    /// by the tag script, in a second round trip.
    async fn lookup_native(
        &self,
        key: &str,
        lease: &LeaseRequest<'_>,
        tags: &[String],
        tag_ttl: Duration,
    ) -> Result<Lookup, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        pipe.cmd("SET")
            .arg(self.redis_key(key))
            .arg(lease_value(lease.token))
            .arg("NX")
            .arg("PX")
            .arg(millis(lease.ttl))
            .arg("GET");
        for tag in tags {
            let slot = self.redis_key(&tag_slot(tag));
            pipe.get(&slot);
            pipe.cmd("PEXPIRE")
                .arg(&slot)
                .arg(millis(tag_ttl))
                .arg("GT")
                .ignore();
        }
        pipe.get(self.redis_key(SEQUENCE_SLOT));
        pipe.cmd("CLIENT").arg("ID");
        let sent_with = self.client.load(Ordering::Acquire);
        let values: Vec<Value> = self.conn.query(&pipe).await?;
        let (client, values) = split_last(&values)?;
        self.check_connection(sent_with, client)?;
        let (counted, values) = split_last(values)?;
        let [time, old, found @ ..] = values else {
            return Err(StoreError::Protocol(format!("lookup: {values:?}")));
        };
        if found.len() != tags.len() {
            return Err(StoreError::Protocol(format!("lookup: {values:?}")));
        }
        let slot = match (old, bytes(old)) {
            (Value::Nil, _) => Slot::Acquired {
                started: server_micros(time)?,
            },
            (_, Some(b)) if b.starts_with(LEASE_MARK) => Slot::Leased,
            (_, Some(b)) => Slot::Value(b.to_vec()),
            (v, None) => return Err(protocol("lookup", v)),
        };
        let mut tokens: Vec<Option<TagToken>> =
            found.iter().map(parse_token).collect::<Result<_, _>>()?;
        let missing: Vec<usize> = (0..tokens.len()).filter(|&i| tokens[i].is_none()).collect();
        if !missing.is_empty() {
            let mut pipe = redis::pipe();
            for &i in &missing {
                self.push_tag(&mut pipe, &tags[i], Some(tag_ttl));
            }
            for (&i, v) in missing.iter().zip(&self.query(&pipe).await?) {
                tokens[i] = parse_token(v)?;
            }
        }
        let tags = tokens
            .into_iter()
            .map(|t| t.ok_or_else(|| StoreError::Protocol("a created tag token is missing".into())))
            .collect::<Result<_, _>>()?;
        Ok(Lookup {
            slot,
            tags,
            sequence: sequence(counted)?,
        })
    }

    /// Whether the server takes the commands of `lookup_native`: tried on a slot of this prefix, removed in
    /// the same round trip (a server error, such as a syntax error before Redis 7.0 or a command the ACL
    /// denies, means no).
    async fn takes_native_lease(&self) -> Result<bool, StoreError> {
        let slot = self.redis_key(PROBE_SLOT);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&slot)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(1_000)
            .arg("GET")
            .cmd("PEXPIRE")
            .arg(&slot)
            .arg(1_000)
            .arg("GT")
            .cmd("UNLINK")
            .arg(&slot);
        match self.conn.query::<Vec<Value>>(&pipe).await {
            Ok(_) => Ok(true),
            Err(StoreError::Redis(e)) if is_server_error(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The consumer name of the data under this prefix on this server: a random id kept in the slot
    /// `prefix + "<consumer>"` (created by the first store to connect, without expiry), so that every store
    /// on the same server and prefix has the same name, however it was connected.
    async fn dataset_id(&self) -> Result<String, StoreError> {
        let slot = self.redis_key(CONSUMER_SLOT);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&slot)
            .arg(nonce())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&slot);
        let (id,): (String,) = self.conn.query(&pipe).await?;
        Ok(format!("redis {} {id}", self.prefix))
    }

    /// Makes every invalidation wait until `replicas` replicas acknowledged it (Redis `WAIT`, at most
    /// `timeout`); fewer in time is a store error, so the keys stay in the outbox and are delivered again
    /// (and a pool's reads bypass the cache until they are).
    ///
    /// Without it, a replica promoted after the primary acknowledged deletes it had not yet replicated
    /// serves entries those deletes removed, until a pool notices that the store's
    /// [sequence](crate::Store::sequence) went back and drops every namespace of its registry (a cold cache).
    /// With it, a promotion loses no acknowledged invalidation, at the price of one replication round trip
    /// per delivery (write latency), and a cache that stops serving while fewer replicas answer.
    #[must_use]
    pub fn wait_for_replicas(mut self, replicas: u64, timeout: Duration) -> Self {
        self.wait = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full Redis key of a cache key.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    /// A pipeline that invalidates `keys`: `UNLINK` of their value and tag slots (a shape has only its
    /// tag slot), up to 500 slots per command, each followed by a `PUBLISH` of its keys on the
    /// [invalidation channel](Self::channel) (what every [`TieredStore`](crate::TieredStore)'s in-process
    /// tier listens to), so the fan-out leaves in the same round trip as the invalidation.
    fn unlink(&self, keys: &[String]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        let channel = self.channel();
        for chunk in keys.chunks(UNLINK_KEYS / 2) {
            let mut unlink = redis::cmd("UNLINK");
            for key in chunk {
                if !is_shape(key) {
                    unlink.arg(self.redis_key(key));
                }
                unlink.arg(self.redis_key(&tag_slot(key)));
            }
            pipe.add_command(unlink).ignore();
            pipe.publish(&channel, fanout::encode(chunk)).ignore();
        }
        pipe
    }

    /// The pub/sub channel on which every invalidation of this prefix is published (its keys, see
    /// [`TieredStore`](crate::TieredStore)): `prefix + "<invalidated>"`.
    pub fn channel(&self) -> String {
        self.redis_key(CHANNEL_SLOT)
    }

    /// Publishes `payload` on the [invalidation channel](Self::channel) (the fan-out's heartbeat).
    pub(crate) async fn publish(&self, payload: &[u8]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.publish(self.channel(), payload).ignore();
        self.conn.query::<()>(&pipe).await
    }

    /// Checks the `CLIENT ID` answered to a read sent while the last known one was `sent_with`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Reconnected`] when the read was answered on another connection than the one known
    /// when it was sent: the server may have restarted from an older snapshot, or be a promoted replica.
    fn check_connection(&self, sent_with: u64, answer: &Value) -> Result<(), StoreError> {
        let id = int(answer)
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| protocol("CLIENT ID", answer))?;
        #[cfg(feature = "deadpool-redis")]
        if matches!(self.conn, Connection::Pool(_)) {
            // A pooled connection serves one call at a time: its first answer is the only one to check.
            let mut seen = self
                .pooled
                .lock()
                .map_err(|_| StoreError::Protocol("poisoned lock".into()))?;
            let first = seen.is_empty();
            return if seen.insert(id) && !first {
                Err(StoreError::Reconnected)
            } else {
                Ok(())
            };
        }
        if sent_with == id {
            return Ok(());
        }
        // The first reads (sent before any answer) all learn the same id.
        if sent_with == 0 {
            match self
                .client
                .compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(accepted) if accepted == id => return Ok(()),
                Err(_) => {}
            }
        }
        // Not accepted here: every read on the new connection fails until a check vouched for it, so that
        // none is served (on another task) before the failure of this one closed the gate.
        self.newest.store(id, Ordering::Release);
        Err(StoreError::Reconnected)
    }

    async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for script in self.scripts.all() {
            pipe.load_script(script).ignore();
        }
        self.conn.query::<()>(&pipe).await
    }

    /// Runs `pipe`; when the server lost the scripts (restart, `SCRIPT FLUSH`), loads them and retries once.
    async fn query(&self, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        match self.conn.query::<Vec<Value>>(pipe).await {
            Err(StoreError::Redis(e))
                if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
            {
                self.load_scripts().await?;
                self.conn.query(pipe).await
            }
            other => other,
        }
    }

    /// Runs one script invocation (reloading the scripts if the server lost them); returns its answer.
    async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(invocation);
        self.query(&pipe)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Protocol("empty pipeline answer".into()))
    }

    fn push_tag(&self, pipe: &mut Pipeline, tag: &str, create: Option<Duration>) {
        let ttl_ms = create.map_or(0, |d| d.as_millis().max(1));
        pipe.invoke_script(
            self.scripts
                .tag
                .key(self.redis_key(&tag_slot(tag)))
                .arg(nonce())
                .arg(u64::try_from(ttl_ms).unwrap_or(u64::MAX)),
        );
    }
}

/// The slot (under the prefix) of the id naming this prefix's data as an outbox consumer.
const CONSUMER_SLOT: &str = "<consumer>";

/// The pub/sub channel (under the prefix) of invalidated keys.
const CHANNEL_SLOT: &str = "<invalidated>";

/// The slot (under the prefix) of the prefix's sequence.
const SEQUENCE_SLOT: &str = "<sequence>";

/// The slot (under the prefix) that tells whether the server takes the script-free lease.
const PROBE_SLOT: &str = "<probe>";

/// Whether `e` is an error the server answered (not one of the connection).
fn is_server_error(e: &redis::RedisError) -> bool {
    e.kind() != ErrorKind::Io && !e.is_connection_dropped() && !e.is_timeout() && e.code().is_some()
}

/// Slots per `UNLINK` command of an invalidation.
const UNLINK_KEYS: usize = 500;

/// What a value slot holds while `token` leases it.
fn lease_value(token: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(LEASE_MARK.len() + token.len());
    value.extend_from_slice(LEASE_MARK);
    value.extend_from_slice(token.as_bytes());
    value
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis().max(1)).unwrap_or(u64::MAX)
}

/// The entry a value slot's answer holds: `None` when it is empty or leased.
pub(crate) fn entry_of(v: &Value) -> Option<Vec<u8>> {
    bytes(v)
        .filter(|b| !b.starts_with(LEASE_MARK))
        .map(<[u8]>::to_vec)
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

/// A sequence as the server answers it (a missing slot is 0).
fn sequence(v: &Value) -> Result<Option<u64>, StoreError> {
    match v {
        Value::Nil => Ok(Some(0)),
        v => int(v)
            .and_then(|i| u64::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| protocol("sequence", v)),
    }
}

/// The answer of the last command of a pipeline, and the others.
fn split_last(values: &[Value]) -> Result<(&Value, &[Value]), StoreError> {
    values
        .split_last()
        .ok_or_else(|| StoreError::Protocol("empty pipeline answer".into()))
}

fn protocol(what: &str, v: &Value) -> StoreError {
    StoreError::Protocol(format!("{what}: {v:?}"))
}

/// The server's `TIME` answer in microseconds.
fn server_micros(v: &Value) -> Result<u64, StoreError> {
    match v {
        Value::Array(parts) => micros(parts).ok_or_else(|| protocol("TIME", v)),
        _ => Err(protocol("TIME", v)),
    }
}

/// Seconds and microseconds (as `TIME` answers them) in microseconds.
fn micros(parts: &[Value]) -> Option<u64> {
    let (s, us) = (parts.first().and_then(int)?, parts.get(1).and_then(int)?);
    u64::try_from(s * 1_000_000 + us).ok()
}

fn parse_slot(v: &Value) -> Result<Slot, StoreError> {
    let Value::Array(items) = v else {
        return Err(protocol("lookup", v));
    };
    match items.first().and_then(int) {
        Some(1) => items
            .get(1)
            .and_then(bytes)
            .map(|b| Slot::Value(b.to_vec()))
            .ok_or_else(|| protocol("lookup", v)),
        Some(2) => Ok(Slot::Leased),
        Some(3) => items
            .get(1..)
            .and_then(micros)
            .map(|started| Slot::Acquired { started })
            .ok_or_else(|| protocol("lookup", v)),
        _ => Err(protocol("lookup", v)),
    }
}

/// Parses a token `nonce.<microseconds>`.
pub(crate) fn parse_token(v: &Value) -> Result<Option<TagToken>, StoreError> {
    if matches!(v, Value::Nil) {
        return Ok(None);
    }
    let text = bytes(v)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or_else(|| protocol("tag token", v))?;
    let created = text
        .rsplit_once('.')
        .and_then(|(_, t)| t.parse::<u64>().ok())
        .ok_or_else(|| protocol("tag token", v))?;
    Ok(Some(TagToken {
        id: text.to_owned(),
        created,
    }))
}

impl Store for RedisStore {
    fn consumer(&self) -> String {
        self.consumer.clone()
    }

    fn system_name(&self) -> Option<&'static str> {
        Some("redis")
    }

    fn vouch(&self) {
        let newest = self.newest.load(Ordering::Acquire);
        if newest != 0 {
            self.client.store(newest, Ordering::Release);
        }
    }

    fn invalidate<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            // `UNLINK` of up to 500 slots per command, in one pipeline: a few commands instead of two per key;
            // then the sequence, and with `wait_for_replicas` the replicas' acknowledgement.
            let mut pipe = self.unlink(keys);
            pipe.incr(self.redis_key(SEQUENCE_SLOT), 1);
            if let Some((replicas, timeout)) = self.wait {
                pipe.cmd("WAIT").arg(replicas).arg(millis(timeout));
            }
            let values = self.query(&pipe).await?;
            let (counted, wait) = match self.wait {
                Some((wanted, _)) => {
                    let (acked, rest) = split_last(&values)?;
                    let acknowledged = int(acked)
                        .and_then(|i| u64::try_from(i).ok())
                        .ok_or_else(|| protocol("WAIT", acked))?;
                    (
                        rest.last(),
                        (acknowledged < wanted).then_some((acknowledged, wanted)),
                    )
                }
                None => (values.last(), None),
            };
            if let Some((acknowledged, wanted)) = wait {
                return Err(StoreError::Replication {
                    acknowledged,
                    wanted,
                });
            }
            counted.map_or_else(
                || Err(StoreError::Protocol("empty pipeline answer".into())),
                sequence,
            )
        })
    }

    fn reset<'a>(
        &'a self,
        keys: &'a [String],
        at_least: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let mut pipe = self.unlink(keys);
            pipe.incr(self.redis_key(SEQUENCE_SLOT), 1).ignore();
            pipe.invoke_script(
                self.scripts
                    .sequence
                    .key(self.redis_key(SEQUENCE_SLOT))
                    .arg(at_least),
            );
            let values = self.query(&pipe).await?;
            sequence(split_last(&values)?.0)
        })
    }

    fn sequence(&self, at_least: u64) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let mut script = self.scripts.sequence.key(self.redis_key(SEQUENCE_SLOT));
            sequence(&self.invoke(script.arg(at_least)).await?)
        })
    }

    fn peek<'a>(
        &'a self,
        key: &'a str,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Peek, StoreError>> {
        Box::pin(async move {
            // One `MGET` of the value slot and the tag tokens: one command for the server to parse and
            // answer, where a pipeline of `GET`s costs one per slot.
            let mut mget = redis::cmd("MGET");
            mget.arg(self.redis_key(key));
            for tag in tags {
                mget.arg(self.redis_key(&tag_slot(tag)));
            }
            mget.arg(self.redis_key(SEQUENCE_SLOT));
            let mut pipe = redis::pipe();
            pipe.cmd("CLIENT").arg("ID").add_command(mget);
            let sent_with = self.client.load(Ordering::Acquire);
            let answers: Vec<Value> = self.conn.query(&pipe).await?;
            let [client, Value::Array(values)] = answers.as_slice() else {
                return Err(StoreError::Protocol(format!("peek: {answers:?}")));
            };
            self.check_connection(sent_with, client)?;
            let (counted, values) = split_last(values)?;
            let (first, rest) = values
                .split_first()
                .ok_or_else(|| StoreError::Protocol("empty pipeline answer".into()))?;
            let value = entry_of(first);
            let tags = rest.iter().map(parse_token).collect::<Result<_, _>>()?;
            Ok(Peek {
                value,
                tags,
                sequence: sequence(counted)?,
            })
        })
    }

    fn lookup<'a>(
        &'a self,
        key: &'a str,
        lease: LeaseRequest<'a>,
        tags: &'a [String],
        tag_ttl: Duration,
    ) -> BoxFuture<'a, Result<Lookup, StoreError>> {
        Box::pin(async move {
            if lease.replace.is_none() && self.native.load(Ordering::Relaxed) {
                let result = self.lookup_native(key, &lease, tags, tag_ttl).await;
                // Not retried with the script in this call: the `SET` may have taken the lease already,
                // and the script would then wait for it. The read falls through to the loader once.
                if let Err(StoreError::Redis(e)) = &result
                    && e.code() == Some("ERR")
                {
                    tracing::warn!(error = %e, "the server refused the script-free lease; using the lookup script from now on");
                    self.native.store(false, Ordering::Relaxed);
                }
                return result;
            }
            let mut pipe = redis::pipe();
            pipe.invoke_script(
                self.scripts
                    .lookup
                    .key(self.redis_key(key))
                    .arg(lease_value(lease.token))
                    .arg(millis(lease.ttl))
                    .arg(lease.replace.unwrap_or_default())
                    .arg(if lease.replace.is_some() { "1" } else { "0" }),
            );
            for tag in tags {
                self.push_tag(&mut pipe, tag, Some(tag_ttl));
            }
            pipe.get(self.redis_key(SEQUENCE_SLOT));
            pipe.cmd("CLIENT").arg("ID");
            let sent_with = self.client.load(Ordering::Acquire);
            let values = self.query(&pipe).await?;
            let (client, values) = split_last(&values)?;
            self.check_connection(sent_with, client)?;
            let (counted, values) = split_last(values)?;
            let (first, rest) = values
                .split_first()
                .ok_or_else(|| StoreError::Protocol("empty pipeline answer".into()))?;
            let slot = parse_slot(first)?;
            let tags = rest
                .iter()
                .map(|v| parse_token(v)?.ok_or_else(|| protocol("created tag token", v)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Lookup {
                slot,
                tags,
                sequence: sequence(counted)?,
            })
        })
    }

    fn tags<'a>(
        &'a self,
        tags: &'a [String],
        create: Option<Duration>,
    ) -> BoxFuture<'a, Result<Vec<Option<TagToken>>, StoreError>> {
        Box::pin(async move {
            if tags.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for tag in tags {
                match create {
                    Some(_) => self.push_tag(&mut pipe, tag, create),
                    None => {
                        pipe.get(self.redis_key(&tag_slot(tag)));
                    }
                }
            }
            self.query(&pipe).await?.iter().map(parse_token).collect()
        })
    }

    fn fill<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
        value: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut fill = self.scripts.fill.key(self.redis_key(key));
            let mut pipe = redis::pipe();
            pipe.cmd("CLIENT").arg("ID");
            pipe.invoke_script(fill.arg(lease_value(lease)).arg(value).arg(millis(ttl)));
            let sent_with = self.client.load(Ordering::Acquire);
            let values = self.query(&pipe).await?;
            let [client, answer] = values.as_slice() else {
                return Err(StoreError::Protocol(format!("fill: {values:?}")));
            };
            let filled = int(answer) == Some(1);
            if let Err(error) = self.check_connection(sent_with, client) {
                // Filled on a new connection: the lease may be one a restore brought back (taken before
                // the snapshot, deleted by an invalidation the server forgot). Take the value back.
                if filled {
                    let mut unlink = redis::pipe();
                    unlink.cmd("UNLINK").arg(self.redis_key(key)).ignore();
                    self.query(&unlink).await?;
                }
                return Err(error);
            }
            Ok(filled)
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut release = self.scripts.release.key(self.redis_key(key));
            self.invoke(release.arg(lease_value(lease))).await.map(drop)
        })
    }
}
