//! Deletes the outbox rows writers delivered, in batches, off the callers' path.

use std::time::Duration;

use sqlx::Pool;
use tokio::sync::mpsc;

use super::Consumer;
use crate::backend::Backend;

/// Rows per delete.
const BATCH: usize = 10_000;

/// How long a delete waits for more delivered rows to arrive, so that a stream of writes costs few deletes.
/// Until deleted, rows are younger than the relay's grace period, so nobody delivers them twice.
const COLLECT: Duration = Duration::from_millis(50);

/// Deletes the ids received on `receiver` until every sender is gone, recording the highest store sequence
/// of their deliveries with the deletion. A failed delete is logged: the relay delivers those rows again
/// after the grace period (harmless).
pub(crate) async fn delete_delivered<DB: Backend>(
    pool: Pool<DB>,
    consumer: Consumer,
    mut receiver: mpsc::UnboundedReceiver<(Vec<i64>, u64)>,
) {
    while let Some((mut ids, mut sequence)) = receiver.recv().await {
        tokio::time::sleep(COLLECT).await;
        while ids.len() < BATCH {
            match receiver.try_recv() {
                Ok((more, seen)) => {
                    ids.extend(more);
                    sequence = sequence.max(seen);
                }
                Err(_) => break,
            }
        }
        if let Err(error) = DB::delete(&pool, &consumer, &ids, sequence).await {
            tracing::debug!(%error, rows = ids.len(), "could not delete delivered outbox rows; the relay will deliver them again");
        }
    }
}
