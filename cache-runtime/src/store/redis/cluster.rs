//! The Redis Cluster store: the same scripts and semantics as [`RedisStore`](super::RedisStore), on
//! redis-rs' `cluster-async` connection (which follows `MOVED`/`ASK` redirections, refreshes the slot map
//! after a failover or a resharding, and splits multi-key `MGET`/`UNLINK` by slot).
//!
//! Layout, under the prefix `P` (which must not contain `{` or `}`): the value slot of key `K` (entry or
//! lease) is `P{h}K` and its tag token `P{h}<tag>K`, where `h` is a hash of `K` (64-bit FNV-1a, in hex)
//! used as the Redis hash tag, so that the value, the lease and the tag token of one key live in one hash
//! slot whatever `K` contains; a shape `S` has its tag token at `P{h(S)}<tag>S`.
//!
//! **Sequence, per shard.** The dataset of each shard can go back on its own (a replica promoted before
//! it received the last deletes), so the store keeps one sequence key per primary (found when the store
//! connects: a hash tag in one of its slots). Every invalidation raises all of them after its `UNLINK`s
//! were answered (so a replica that has a shard's raise has that shard's deletes), and every read returns
//! their **minimum**: a shard that lost raises answers less than the floor the pool knows, and the pool
//! repairs the store (replays the invalidations) before it serves hits again. A resharding that leaves a
//! primary without a sequence key is not detected until the store is connected again; reconnect stores
//! after moving slots to a new primary.

use std::time::Duration;

use futures_util::future::try_join_all;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Value};

use super::{
    FILL, LOOKUP, RELEASE, SEQUENCE, TAG, entry_of, int, lease_value, millis, parse_slot,
    parse_token, protocol, sequence,
};
use crate::store::tiered::fanout;
use crate::store::{
    BoxFuture, LeaseRequest, Lookup, Peek, Store, StoreError, TagToken, is_shape, nonce,
};

/// A [`Store`] on a Redis Cluster.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> Result<(), cache_runtime::StoreError> {
/// let nodes = ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"];
/// let store = cache_runtime::RedisClusterStore::connect(&nodes, "myapp:").await?;
/// let cache = cache_runtime::Cache::new(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisClusterStore {
    conn: ClusterConnection,
    prefix: String,
    consumer: String,
    /// One sequence key per primary.
    sequences: std::sync::Arc<[String]>,
}

impl std::fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterStore")
            .field("prefix", &self.prefix)
            .field("shards", &self.sequences.len())
            .finish_non_exhaustive()
    }
}

/// The hash of a key whose hex is its hash tag (FNV-1a: stable across processes and versions).
fn fnv(text: &str) -> u64 {
    cache_template::fnv1a64(text.as_bytes())
}

/// A hash tag whose slot is `slot`.
fn tag_in(slot: u16) -> String {
    (0_u64..)
        .map(|i| format!("s{i}"))
        .find(|tag| {
            Slot::for_key(format!("{{{tag}}}")) == Slot::new(slot).unwrap_or(Slot::for_key(""))
        })
        .unwrap_or_default()
}

impl RedisClusterStore {
    /// Connects to the cluster through any of `nodes` (URLs such as `redis://127.0.0.1:7000`); every key
    /// this store touches starts with `prefix`. Commands wait at most 1 s for their answer.
    ///
    /// # Errors
    ///
    /// [`StoreError::Redis`] when no node can be reached; [`StoreError::Protocol`] when `prefix` contains
    /// `{` or `}`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the connection being set up; at most the consumer id is written.
    pub async fn connect(nodes: &[&str], prefix: impl Into<String>) -> Result<Self, StoreError> {
        let client = ClusterClient::builder(nodes.iter().copied())
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(1))
            .retries(3)
            .build()?;
        Self::with_connection(client.get_async_connection().await?, prefix).await
    }

    /// A store on a cluster connection the application already has; every key this store touches starts
    /// with `prefix`.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    ///
    /// # Cancel safety
    ///
    /// As [`connect`](Self::connect).
    pub async fn with_connection(
        conn: ClusterConnection,
        prefix: impl Into<String>,
    ) -> Result<Self, StoreError> {
        let prefix = prefix.into();
        if prefix.contains(['{', '}']) {
            return Err(StoreError::Protocol(format!(
                "a cluster store's prefix must not contain braces (they choose hash slots): {prefix:?}"
            )));
        }
        let mut store = Self {
            conn,
            prefix,
            consumer: String::new(),
            sequences: std::sync::Arc::from(Vec::new()),
        };
        let sequences: Vec<String> = store
            .primaries()
            .await?
            .into_iter()
            .map(|slot| format!("{}{{{}}}<sequence>", store.prefix, tag_in(slot)))
            .collect();
        store.sequences = sequences.into();
        store.consumer = store.dataset_id().await?;
        Ok(store)
    }

    /// The first slot of each primary (from `CLUSTER SLOTS`).
    async fn primaries(&self) -> Result<Vec<u16>, StoreError> {
        let answer: Value = self.run(redis::cmd("CLUSTER").arg("SLOTS")).await?;
        let Value::Array(ranges) = &answer else {
            return Err(protocol("CLUSTER SLOTS", &answer));
        };
        let mut firsts: Vec<(String, u16)> = Vec::new();
        for range in ranges {
            let Value::Array(items) = range else {
                return Err(protocol("CLUSTER SLOTS", range));
            };
            let start = items
                .first()
                .and_then(int)
                .and_then(|s| u16::try_from(s).ok());
            let node = match items.get(2) {
                Some(Value::Array(node)) => format!("{:?}", node.get(..2)),
                _ => String::new(),
            };
            let start = start.ok_or_else(|| protocol("CLUSTER SLOTS", range))?;
            match firsts.iter_mut().find(|(n, _)| *n == node) {
                Some((_, first)) => *first = (*first).min(start),
                None => firsts.push((node, start)),
            }
        }
        Ok(firsts.into_iter().map(|(_, slot)| slot).collect())
    }

    async fn dataset_id(&self) -> Result<String, StoreError> {
        let slot = format!("{}<consumer>", self.prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&slot)
            .arg(nonce())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&slot);
        let (id,): (String,) = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(format!("redis-cluster {} {id}", self.prefix))
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key of the value slot of `key`.
    pub fn value_key(&self, key: &str) -> String {
        format!("{}{{{:016x}}}{key}", self.prefix, fnv(key))
    }

    /// The Redis key of the tag token of `name` (a key or a shape).
    pub fn tag_key(&self, name: &str) -> String {
        format!("{}{{{:016x}}}<tag>{name}", self.prefix, fnv(name))
    }

    /// The pub/sub channel of invalidated keys (as [`RedisStore::channel`](super::RedisStore::channel)).
    pub fn channel(&self) -> String {
        format!("{}<invalidated>", self.prefix)
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        Ok(cmd.query_async(&mut self.conn.clone()).await?)
    }

    /// `EVAL` of `script` on `key` with `args`.
    fn eval(script: &str, key: &str, args: &[&[u8]]) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(1).arg(key);
        for arg in args {
            cmd.arg(*arg);
        }
        cmd
    }

    /// The minimum of the shards' sequences in `answers`.
    fn minimum(answers: &[Value]) -> Result<Option<u64>, StoreError> {
        let mut min: Option<u64> = None;
        for answer in answers {
            let seen = sequence(answer)?.unwrap_or(0);
            min = Some(min.map_or(seen, |m| m.min(seen)));
        }
        Ok(min)
    }

    /// `UNLINK`s the value and tag slots of `keys` (redis-rs splits it by slot, the sub-commands run
    /// concurrently), then publishes the keys on the channel.
    async fn unlink(&self, keys: &[String]) -> Result<(), StoreError> {
        for chunk in keys.chunks(250) {
            let mut unlink = redis::cmd("UNLINK");
            for key in chunk {
                if !is_shape(key) {
                    unlink.arg(self.value_key(key));
                }
                unlink.arg(self.tag_key(key));
            }
            self.run::<Value>(&unlink).await?;
        }
        Ok(())
    }

    async fn publish(&self, keys: &[String]) -> Result<(), StoreError> {
        for chunk in keys.chunks(250) {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(self.channel()).arg(fanout::encode(chunk));
            self.run::<Value>(&publish).await?;
        }
        Ok(())
    }

    /// Publishes `payload` on the channel (on the primary of the channel's slot, as every invalidation).
    pub(crate) async fn publish_payload(&self, payload: &[u8]) -> Result<(), StoreError> {
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.channel()).arg(payload);
        self.run::<Value>(&publish).await.map(drop)
    }

    /// Runs `cmd` for every shard's sequence key, concurrently.
    async fn each_shard(&self, cmd: impl Fn(&str) -> Cmd) -> Result<Vec<Value>, StoreError> {
        try_join_all(self.sequences.iter().map(|key| {
            let cmd = cmd(key);
            async move { self.run::<Value>(&cmd).await }
        }))
        .await
    }

    /// The shards' sequences, in one `MGET` (split by slot).
    fn sequences_mget(&self, mget: &mut Cmd) {
        for key in self.sequences.iter() {
            mget.arg(key);
        }
    }

    fn tag_cmd(&self, tag: &str, create: Duration) -> Cmd {
        let ttl = millis(create).to_string();
        Self::eval(
            TAG,
            &self.tag_key(tag),
            &[nonce().as_bytes(), ttl.as_bytes()],
        )
    }
}

impl Store for RedisClusterStore {
    fn consumer(&self) -> String {
        self.consumer.clone()
    }

    fn system_name(&self) -> Option<&'static str> {
        Some("redis")
    }

    fn invalidate<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            self.unlink(keys).await?;
            // After the deletes were answered: a replica that has a shard's raise has its deletes.
            let raised = self.each_shard(|key| {
                let mut incr = redis::cmd("INCR");
                incr.arg(key);
                incr
            });
            let (raised, published) = futures_util::future::join(raised, self.publish(keys)).await;
            published?;
            Self::minimum(&raised?)
        })
    }

    fn sequence(&self, at_least: u64) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let floor = at_least.to_string();
            let answers = self
                .each_shard(|key| Self::eval(SEQUENCE, key, &[floor.as_bytes()]))
                .await?;
            Self::minimum(&answers)
        })
    }

    fn reset<'a>(
        &'a self,
        keys: &'a [String],
        at_least: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            self.unlink(keys).await?;
            self.publish(keys).await?;
            let floor = at_least.to_string();
            self.each_shard(|key| {
                let mut incr = redis::cmd("INCR");
                incr.arg(key);
                incr
            })
            .await?;
            let answers = self
                .each_shard(|key| Self::eval(SEQUENCE, key, &[floor.as_bytes()]))
                .await?;
            Self::minimum(&answers)
        })
    }

    fn peek<'a>(
        &'a self,
        key: &'a str,
        tags: &'a [String],
    ) -> BoxFuture<'a, Result<Peek, StoreError>> {
        Box::pin(async move {
            let mut mget = redis::cmd("MGET");
            mget.arg(self.value_key(key));
            for tag in tags {
                mget.arg(self.tag_key(tag));
            }
            self.sequences_mget(&mut mget);
            let answer: Value = self.run(&mget).await?;
            let Value::Array(values) = &answer else {
                return Err(protocol("peek", &answer));
            };
            let (first, rest) = values
                .split_first()
                .ok_or_else(|| protocol("peek", &answer))?;
            let (tag_values, sequences) =
                rest.split_at(rest.len().saturating_sub(self.sequences.len()));
            let value = entry_of(first);
            Ok(Peek {
                value,
                tags: tag_values
                    .iter()
                    .map(parse_token)
                    .collect::<Result<_, _>>()?,
                sequence: Self::minimum(sequences)?,
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
            let ttl = millis(lease.ttl).to_string();
            let flag: &[u8] = if lease.replace.is_some() { b"1" } else { b"0" };
            let lookup = Self::eval(
                LOOKUP,
                &self.value_key(key),
                &[
                    &lease_value(lease.token),
                    ttl.as_bytes(),
                    lease.replace.unwrap_or_default(),
                    flag,
                ],
            );
            let mut commands = vec![lookup];
            commands.extend(tags.iter().map(|t| self.tag_cmd(t, tag_ttl)));
            let mut mget = redis::cmd("MGET");
            self.sequences_mget(&mut mget);
            commands.push(mget);
            let mut answers =
                try_join_all(commands.iter().map(|cmd| self.run::<Value>(cmd))).await?;
            let counted = answers.pop().unwrap_or(Value::Nil);
            let Value::Array(sequences) = &counted else {
                return Err(protocol("sequences", &counted));
            };
            let slot = parse_slot(answers.first().unwrap_or(&Value::Nil))?;
            let tags = answers[1..]
                .iter()
                .map(|v| parse_token(v)?.ok_or_else(|| protocol("created tag token", v)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Lookup {
                slot,
                tags,
                sequence: Self::minimum(sequences)?,
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
            let values = match create {
                Some(ttl) => {
                    let commands: Vec<Cmd> = tags.iter().map(|t| self.tag_cmd(t, ttl)).collect();
                    try_join_all(commands.iter().map(|cmd| self.run::<Value>(cmd))).await?
                }
                None => {
                    let mut mget = redis::cmd("MGET");
                    for tag in tags {
                        mget.arg(self.tag_key(tag));
                    }
                    match self.run::<Value>(&mget).await? {
                        Value::Array(values) => values,
                        other => return Err(protocol("MGET", &other)),
                    }
                }
            };
            values.iter().map(parse_token).collect()
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
            let ttl = millis(ttl).to_string();
            let fill = Self::eval(
                FILL,
                &self.value_key(key),
                &[&lease_value(lease), value, ttl.as_bytes()],
            );
            Ok(int(&self.run::<Value>(&fill).await?) == Some(1))
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        lease: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let release = Self::eval(RELEASE, &self.value_key(key), &[&lease_value(lease)]);
            self.run::<Value>(&release).await.map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_and_its_tag_token_share_a_slot() {
        let key = |k: &str| format!("p:{{{:016x}}}{k}", fnv(k));
        let tag = |k: &str| format!("p:{{{:016x}}}<tag>{k}", fnv(k));
        for k in ["item:1", "a}b{c", "}", "x:<>"] {
            assert_eq!(Slot::for_key(key(k)), Slot::for_key(tag(k)), "{k}");
        }
        assert_eq!(
            Slot::for_key(format!("{{{}}}", tag_in(1234))),
            Slot::new(1234).unwrap()
        );
    }
}
