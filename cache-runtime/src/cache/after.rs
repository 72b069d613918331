//! Reads after a [`WriteToken`]: whether the token's write was delivered to this cache's store (see the
//! [`token`](crate::token) module).

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::{Cache, LoadOptions};
use crate::key::Key;
use crate::token::WriteToken;

impl Cache {
    /// Whether a read may use the store after the write of `token`: delivered to this store (known from
    /// the token, or asked of the database until [`token_wait`](super::CacheBuilder::token_wait) has
    /// passed). `false`: bypass the store.
    pub(super) async fn caught_up(&self, token: &WriteToken) -> bool {
        if token.position() == 0 {
            return true;
        }
        let Some(positions) = self.inner.guarded.positions.get().and_then(Weak::upgrade) else {
            return false;
        };
        if token.delivered_to(positions.consumer()) {
            return true;
        }
        let deadline = Instant::now() + self.inner.config.token_wait;
        let mut backoff = Duration::from_millis(1);
        loop {
            match positions.delivered(token.position()).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(error) => {
                    tracing::debug!(%error, "cannot tell whether a token's write was delivered; bypassing the cache");
                    return false;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    /// [`get_or_load`](Self::get_or_load) that never returns a value older than the write of `token`, made
    /// by any process: [`LoadOptions::after`].
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load).
    ///
    /// # Cancel safety
    ///
    /// As [`get_or_load`](Self::get_or_load).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use cache_runtime::{CachedEntity, CachedPgPool, key, token::WriteToken};
    /// # #[derive(CachedEntity, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
    /// # #[cached_entity(key = "product:<id>")]
    /// # struct Product { id: i64, name: String }
    /// # async fn f(pool: CachedPgPool, header: &str) -> Result<(), Box<dyn std::error::Error>> {
    /// let token: WriteToken = header.parse()?; // from the writer, e.g. an `x-cache-token` header
    /// let p: Option<Product> = pool
    ///     .cache()
    ///     .get_or_load_after(token, key!("product:<id>", id = 7), || {
    ///         sqlx::query_as("SELECT id, name FROM products WHERE id = 7").fetch_optional(pool.sqlx_pool())
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load_after<V, E, F, Fut>(
        &self,
        token: WriteToken,
        key: Key,
        loader: F,
    ) -> Result<V, Arc<E>>
    where
        V: Serialize + DeserializeOwned,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        self.get_or_load_with(key, LoadOptions::new().after(token), loader)
            .await
    }
}
