//! The Redis store.

use redis::aio::ConnectionManager;

use super::{BoxFuture, Store, StoreError};

/// A [`Store`] on Redis, through redis-rs' reconnecting [`ConnectionManager`].
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> Result<(), cache_runtime::StoreError> {
/// let store = cache_runtime::RedisStore::connect("redis://127.0.0.1:6379", "myapp:").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
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
    /// # Errors
    ///
    /// [`StoreError::Redis`] when the URL is invalid or the server cannot be reached.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self {
            conn,
            prefix: prefix.into(),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full Redis key of a cache key.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }
}

impl Store for RedisStore {
    fn invalidate<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.del(self.redis_key(key)).ignore();
            }
            let mut conn = self.conn.clone();
            pipe.query_async::<()>(&mut conn).await?;
            Ok(())
        })
    }
}
