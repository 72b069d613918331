//! The fan-out: invalidated keys travel on a Redis pub/sub channel, published by every
//! [`RedisStore`] in the same pipeline as the `UNLINK`s; each [`TieredStore`](super::TieredStore)
//! subscribes and removes them from its in-process tier.
//!
//! A message is either a list of keys, each written `<length>:<key>` (lengths in bytes, decimal), or a
//! heartbeat `!<instance>:<microseconds>`: each instance publishes one every `heartbeat` and, when its own
//! comes back, knows that everything published before it was sent has been applied (pub/sub keeps the
//! order of one connection). The tier serves only while a recent heartbeat came back.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::watch;

use super::Backend;
use super::local::Local;

/// Encodes keys as one message.
pub(crate) fn encode<S: AsRef<str>>(keys: &[S]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.iter().map(|k| k.as_ref().len() + 4).sum());
    for key in keys {
        let key = key.as_ref();
        out.extend_from_slice(key.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(key.as_bytes());
    }
    out
}

/// Decodes a message of keys; `None` when it is not one.
pub(crate) fn decode(mut message: &[u8]) -> Option<Vec<String>> {
    let mut keys = Vec::new();
    while !message.is_empty() {
        let colon = message.iter().position(|b| *b == b':')?;
        let len: usize = std::str::from_utf8(&message[..colon]).ok()?.parse().ok()?;
        let rest = &message[colon + 1..];
        let key = rest.get(..len)?;
        keys.push(std::str::from_utf8(key).ok()?.to_owned());
        message = &rest[len..];
    }
    Some(keys)
}

/// A heartbeat of instance `id`, sent at `sent` µs.
fn heartbeat_message(id: &str, sent: u64) -> Vec<u8> {
    format!("!{id}:{sent}").into_bytes()
}

/// Applies one message to the tier.
fn receive(local: &Local, message: &[u8]) {
    if let Some(beat) = message.strip_prefix(b"!") {
        let beat = std::str::from_utf8(beat)
            .ok()
            .and_then(|b| b.rsplit_once(':'));
        if let Some((id, sent)) = beat
            && id == local.id
            && let Ok(sent) = sent.parse()
        {
            local.confirm(sent);
        }
        return;
    }
    match decode(message) {
        Some(keys) => local.apply(&keys),
        None => {
            tracing::warn!("undecodable invalidation message; flushing the in-process tier");
            local.flush();
        }
    }
}

/// Listens to `channel` until `shutdown` closes, resubscribing (with backoff) whenever the subscription
/// drops; the tier is flushed and unusable from a drop until a heartbeat comes back on the new one.
pub(super) async fn listen(
    client: redis::Client,
    channel: String,
    local: Arc<Local>,
    mut shutdown: watch::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match subscribe(&client, &channel).await {
            Ok(pubsub) => {
                backoff = Duration::from_millis(10);
                local.connected();
                crate::observe::fanout_connected(true);
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(m) => receive(&local, m.get_payload_bytes()),
                            None => break,
                        },
                        _ = shutdown.changed() => return,
                    }
                }
                tracing::warn!(%channel, "invalidation channel dropped; bypassing the in-process tier");
            }
            Err(error) => {
                tracing::debug!(%error, "cannot subscribe to the invalidation channel");
            }
        }
        local.disconnected();
        crate::observe::fanout_connected(false);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

/// Publishes this instance's heartbeat every `every` until `shutdown` closes.
pub(super) async fn heartbeat(
    l2: Backend,
    local: Arc<Local>,
    every: Duration,
    mut shutdown: watch::Receiver<()>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let message = heartbeat_message(&local.id, local.now());
        if let Err(error) = l2.publish(&message).await {
            tracing::debug!(%error, "cannot publish the fan-out heartbeat");
        }
    }
}

/// A cluster client whose connections deliver pub/sub messages as RESP3 pushes.
#[cfg(feature = "cluster")]
pub(super) fn cluster_client(
    nodes: &[&str],
) -> Result<redis::cluster::ClusterClientBuilder, crate::store::StoreError> {
    for node in nodes {
        redis::Client::open(*node)?;
    }
    Ok(redis::cluster::ClusterClientBuilder::new(
        nodes.iter().copied(),
    ))
}

/// [`listen`] on a cluster: a RESP3 cluster connection subscribed to `channel` (on the primary of the
/// channel's slot, where every invalidation and heartbeat is published). When any of its node connections
/// drops, the tier is flushed and the connection made again (a failover moves the channel's slot to the
/// promoted replica); the tier serves once a heartbeat came back through the new subscription.
#[cfg(feature = "cluster")]
pub(super) async fn listen_cluster(
    builder: redis::cluster::ClusterClientBuilder,
    channel: String,
    local: Arc<Local>,
    mut shutdown: watch::Receiver<()>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
    let client = match builder
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(tx)
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(1))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(%error, "cannot build the cluster subscription; the in-process tier stays off");
            return;
        }
    };
    let mut backoff = Duration::from_millis(10);
    loop {
        match subscribe_cluster(&client, &channel).await {
            Ok(conn) => {
                backoff = Duration::from_millis(10);
                local.connected();
                crate::observe::fanout_connected(true);
                if !pushes(&local, &mut rx, &mut shutdown).await {
                    return;
                }
                drop(conn);
                tracing::warn!(%channel, "a cluster connection dropped; bypassing the in-process tier");
            }
            Err(error) => tracing::debug!(%error, "cannot subscribe to the invalidation channel"),
        }
        local.disconnected();
        crate::observe::fanout_connected(false);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Applies pushes until a connection drops (`true`) or the store is dropped (`false`).
#[cfg(feature = "cluster")]
async fn pushes(
    local: &Local,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    shutdown: &mut watch::Receiver<()>,
) -> bool {
    loop {
        let push = tokio::select! {
            push = rx.recv() => push,
            _ = shutdown.changed() => return false,
        };
        let Some(push) = push else {
            return false;
        };
        match push.kind {
            redis::PushKind::Message => match push.data.get(1) {
                Some(redis::Value::BulkString(payload)) => receive(local, payload),
                _ => local.flush(),
            },
            redis::PushKind::Disconnection => return true,
            _ => {}
        }
    }
}

#[cfg(feature = "cluster")]
async fn subscribe_cluster(
    client: &redis::cluster::ClusterClient,
    channel: &str,
) -> redis::RedisResult<redis::cluster_async::ClusterConnection> {
    let mut conn = client.get_async_connection().await?;
    conn.subscribe(channel).await?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let keys = ["a:1", "", "x:<>", "ü:2:3", "10:ab"];
        assert_eq!(decode(&encode(&keys)).unwrap(), keys);
        assert_eq!(decode(b"3:ab"), None);
        assert_eq!(decode(b"x:ab"), None);
    }
}
