//! Keeps instances that share a PostgreSQL database in step: a change made on one instance is
//! announced with NOTIFY in the transaction that stores it, every instance LISTENs and then
//! reconciles with the tables. A periodic reconcile covers notifications lost while a
//! listener reconnects. A SQLite database has one instance, so nothing runs there.

use std::time::Duration;

use tokio::sync::watch;

use super::Connectors;

/// Reconcile interval without notifications.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Follows connector changes made by other instances until `shutdown` turns true.
pub fn spawn_cluster_sync(
    connectors: Connectors,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let listener = match connectors.inner.store.listen_connectors().await {
                Ok(Some(l)) => Some(l),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN for connector changes; polling the database");
                    None
                }
            };
            // Catch up with whatever changed while not listening.
            if let Err(e) = connectors.reconcile().await {
                tracing::warn!(error = %e, "connector reconcile failed; will retry");
            }
            let Some(mut listener) = listener else {
                tokio::select! {
                    _ = tokio::time::sleep(RECONCILE_EVERY) => continue,
                    _ = shutdown.changed() => return,
                }
            };
            loop {
                tokio::select! {
                    n = listener.recv() => match n {
                        Ok(n) => tracing::debug!(connector = n.payload(), "connector change announced"),
                        Err(e) => {
                            tracing::warn!(error = %e, "connector change listener lost; reconnecting");
                            break;
                        }
                    },
                    _ = tokio::time::sleep(RECONCILE_EVERY) => {}
                    _ = shutdown.changed() => return,
                }
                if let Err(e) = connectors.reconcile().await {
                    tracing::warn!(error = %e, "connector reconcile failed; will retry");
                }
            }
        }
    })
}
