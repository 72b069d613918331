//! Settings from the environment, for services configured the twelve-factor way: [`CachedPool::from_env`],
//! [`RedisStore::from_env`] and [`RelayConfig::from_env`].
//!
//! | variable | default | read by |
//! |---|---|---|
//! | `DATABASE_URL` | required | `CachedPool::from_env` |
//! | `REDIS_URL` | `redis://127.0.0.1:6379` | `RedisStore::from_env` |
//! | `CACHE_PREFIX` | empty | `RedisStore::from_env` (the key prefix) |
//! | `RELAY_SWEEP_MS` | 500 | `RelayConfig::from_env` ([`sweep_interval`](RelayConfig::sweep_interval)) |
//! | `RELAY_GRACE_MS` | 2000 | `RelayConfig::from_env` ([`wrapped_grace`](RelayConfig::wrapped_grace)) |
//! | `RELAY_BATCH_ROWS` | 5000 | `RelayConfig::from_env` ([`batch_rows`](RelayConfig::batch_rows)) |
//! | `RELAY_STORE_TIMEOUT_MS` | 500 | `RelayConfig::from_env` ([`store_timeout`](RelayConfig::store_timeout)) |
//! | `CACHE_REPLAY_WINDOW_S` | 300 | `RelayConfig::from_env` ([`replay_window`](RelayConfig::replay_window)) |
//!
//! A variable that is set but malformed is an [`Error::Environment`] naming it, never a silent default.

use std::time::Duration;

use crate::backend::Backend;
use crate::error::Error;
use crate::outbox::RelayConfig;
use crate::pool::{CachedPool, CachedPoolOptions};
use crate::store::RedisStore;

/// The value of `name`, `None` when unset.
fn var(name: &'static str) -> Result<Option<String>, Error> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::Environment {
            name,
            problem: "is not valid UTF-8".to_owned(),
        }),
    }
}

/// The whole number in `name`, `default` when unset.
fn number(name: &'static str, default: u64) -> Result<u64, Error> {
    var(name)?.map_or(Ok(default), |value| {
        value.trim().parse().map_err(|e| Error::Environment {
            name,
            problem: format!("is {value:?}, not a whole number ({e})"),
        })
    })
}

impl RelayConfig {
    /// [`RelayConfig::new`] with the settings the environment gives (see the [module](self) table).
    ///
    /// # Errors
    ///
    /// [`Error::Environment`] for a variable that is set but is not a whole number.
    pub fn from_env() -> Result<Self, Error> {
        let ms = |name, default| number(name, default).map(Duration::from_millis);
        let rows = number("RELAY_BATCH_ROWS", 5000)?;
        Ok(Self::new()
            .sweep_interval(ms("RELAY_SWEEP_MS", 500)?)
            .wrapped_grace(ms("RELAY_GRACE_MS", 2000)?)
            .store_timeout(ms("RELAY_STORE_TIMEOUT_MS", 500)?)
            .replay_window(Duration::from_secs(number("CACHE_REPLAY_WINDOW_S", 300)?))
            .batch_rows(u32::try_from(rows).unwrap_or(u32::MAX)))
    }
}

impl RedisStore {
    /// Connects to `REDIS_URL` (default `redis://127.0.0.1:6379`) with the key prefix `CACHE_PREFIX`
    /// (default empty), as [`connect`](Self::connect).
    ///
    /// # Errors
    ///
    /// [`Error::Environment`] for a variable that is not UTF-8; [`Error::Store`] as `connect`.
    ///
    /// # Cancel safety
    ///
    /// As [`connect`](Self::connect).
    pub async fn from_env() -> Result<Self, Error> {
        let url = var("REDIS_URL")?.unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        let prefix = var("CACHE_PREFIX")?.unwrap_or_default();
        Ok(Self::connect(&url, prefix).await?)
    }
}

impl<DB: Backend> CachedPoolOptions<DB> {
    /// Connects to `DATABASE_URL` with [`RedisStore::from_env`] and the relay settings of
    /// [`RelayConfig::from_env`] (replacing any [`relay_config`](Self::relay_config) set before).
    ///
    /// # Errors
    ///
    /// [`Error::Environment`] when `DATABASE_URL` is unset or a variable is malformed; otherwise as
    /// [`connect`](Self::connect).
    ///
    /// # Cancel safety
    ///
    /// As [`connect`](Self::connect).
    pub async fn from_env(self) -> Result<CachedPool<DB>, Error> {
        let url = var("DATABASE_URL")?.ok_or(Error::Environment {
            name: "DATABASE_URL",
            problem: "is not set; set it to the database's URL (as for sqlx)".to_owned(),
        })?;
        let relay = RelayConfig::from_env()?;
        let store = RedisStore::from_env().await?;
        self.relay_config(relay).connect(&url, store).await
    }
}

impl<DB: Backend> CachedPool<DB> {
    /// Connects as [`CachedPoolOptions::from_env`] with default options.
    ///
    /// # Errors
    ///
    /// As [`CachedPoolOptions::from_env`].
    ///
    /// # Cancel safety
    ///
    /// As [`CachedPoolOptions::from_env`].
    pub async fn from_env() -> Result<Self, Error> {
        CachedPoolOptions::new().from_env().await
    }
}
