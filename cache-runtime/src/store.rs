//! Where cached values live: the [`Store`] trait, with Redis and in-process implementations.
//!
//! A store holds entries under `prefix + key`. Invalidation takes rendered keys (see [`crate::Key`]) and
//! namespace shapes (strings containing `<>`, such as `product:<>`, which no rendered key can contain):
//! a shape invalidates every key of that shape at once.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

pub(crate) mod redis;

/// A boxed, sendable future: what [`Store`] methods return, so that stores can be used as `dyn Store`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A cache backend.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Invalidates `keys` (rendered keys, or namespace shapes containing `<>`), in one round trip where the
    /// backend allows it.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the backend cannot be reached; nothing is known to be invalidated then.
    fn invalidate<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
}
