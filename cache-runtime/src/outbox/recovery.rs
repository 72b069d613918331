//! Reopening a pool's read gate after a store failure (see the [`health`](crate::health) module): wait until
//! the store answers, deliver every outbox row up to the highest id read then, wait until no row up to that
//! id remains (other relays may hold some), check that the store did not forget acknowledged invalidations,
//! and open the gate unless another failure happened meanwhile.

use std::time::Duration;

use super::Relay;
use crate::backend::Backend;
use crate::error::Error;

impl<DB: Backend> Relay<DB> {
    /// Opens the read gate of this relay's health after each store failure. Runs until dropped.
    pub(crate) async fn recover(&self) {
        let health = &self.outbox.guarded.health;
        loop {
            if !health.gated() {
                health.tripped.notified().await;
                continue;
            }
            match self.recover_once().await {
                Ok(epoch) => {
                    // A failure since `epoch` keeps the gate closed: start over.
                    let _ = health.open_gate(epoch);
                }
                Err(error) => {
                    tracing::debug!(%error, "cache recovery: store or database not ready; retrying");
                    let wait = health
                        .until_probe()
                        .max(Duration::from_millis(20))
                        .min(Duration::from_secs(1));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One recovery pass: probe the store, check its sequence, deliver every row up to the outbox's
    /// highest id and wait until none is left, then check the sequence again. Also run at connect, so a
    /// pool never starts serving from a store that forgot. The second check reads what the database
    /// recorded *after* the drain. Each row up to that id was then either delivered by this pass, to the
    /// store as it is now, or deleted by its deliverer. A deletion records the store's sequence in the same
    /// transaction, so if the store lost that invalidation, the check sees its sequence go back.
    ///
    /// Returns the health epoch from which the pass vouches for the store: read after the first
    /// sequence check, whose repair of a forgetful store counts as a failure (so that reads stop using the
    /// store meanwhile) but is the pass's own. A failure after it keeps the gate closed; one before it
    /// left its rows in the outbox, which the drain (its watermark read after the epoch) delivers.
    ///
    /// # Errors
    ///
    /// A store or database error: the pass is retried.
    pub(crate) async fn recover_once(&self) -> Result<u64, Error> {
        let outbox = &self.outbox;
        // A probe through the breaker: a real round trip that changes nothing (the tag token of a slot no
        // key uses).
        let probe = ["<health>".to_owned()];
        outbox
            .guarded
            .call("probe", outbox.config.store_timeout, |store| {
                store.tags(&probe, None)
            })
            .await?;
        // A store known to have forgotten drops every namespace first (else the drain's invalidations
        // would fail the same check).
        outbox.check_sequence().await?;
        let epoch = outbox.guarded.health.epoch();
        // A consumer that lapsed drops its namespaces before its reads use the store again.
        outbox.drop_lost_namespaces().await?;
        let upto = DB::max_id(&outbox.pool).await?;
        self.drain(Some(upto)).await?;
        // Rows up to `upto` claimed by other relays: wait until they are delivered too.
        let mut wait = Duration::from_millis(5);
        while DB::pending_upto(&outbox.pool, &outbox.consumer, upto).await? > 0 {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
            // Rows released by a relay that failed: deliver them ourselves.
            self.drain(Some(upto)).await?;
        }
        outbox.check_sequence().await?;
        // Reads may use the connection the store reconnected on: it is the one just checked (one that
        // changed again since fails the next read, and another pass runs).
        outbox.guarded.store.vouch();
        Ok(epoch)
    }
}
