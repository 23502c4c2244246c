//! The database's part of `/metrics`: deliveries queued per connector and status, and the
//! outbox backlog. Both walk the undelivered rows, so their cost grows with the backlog
//! (37 ms a scrape at 80,000 pending deliveries on PostgreSQL) exactly when operators watch
//! most closely: a dashboard polling every quarter second during an incident spent a tenth
//! of the database's CPU on them, taken from the deliveries that would end the incident.
//! They are therefore read at most once per [`READING_TTL`], by one scrape at a time;
//! scrapes in between (and those that waited for the read in flight) get that reading. The
//! backlog keeps the oldest event's timestamp, not its age, so the age a scrape shows is
//! still computed at the scrape.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::store::Store;
use crate::store::connectors::{Backlog, QueueCounts};

/// How long one reading of the database's gauges serves scrapes: well under any scrape
/// interval Prometheus is set to, long enough that polling cannot multiply the counts.
pub const READING_TTL: Duration = Duration::from_secs(1);

/// Queue counts by connector, or `None` when the database could not answer.
pub type Queues = Option<BTreeMap<String, QueueCounts>>;

/// The last reading, shared by every scrape of this instance.
#[derive(Default)]
pub(super) struct GaugeReadings {
    /// Held across the database reads, so concurrent scrapes share one read.
    last: tokio::sync::Mutex<Option<Reading>>,
}

#[derive(Clone)]
struct Reading {
    /// When the reads started: a reading is never younger than the rows it counted.
    at: Instant,
    queues: BTreeMap<String, QueueCounts>,
    backlog: Backlog,
}

impl GaugeReadings {
    /// The queue counts and the backlog, from a reading at most [`READING_TTL`] old. A
    /// failed read is not kept: the next scrape asks the database again.
    pub(super) async fn read(&self, store: &Store) -> (Queues, Option<Backlog>) {
        let mut last = self.last.lock().await;
        if let Some(r) = last.as_ref().filter(|r| r.at.elapsed() < READING_TTL) {
            return (Some(r.queues.clone()), Some(r.backlog));
        }
        let at = Instant::now();
        let queues = match store.queue_counts(None).await {
            Ok(q) => Some(q),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read delivery queue counts");
                None
            }
        };
        let backlog = match store.backlog().await {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the outbox backlog");
                None
            }
        };
        *last = match (&queues, backlog) {
            (Some(queues), Some(backlog)) => Some(Reading {
                at,
                queues: queues.clone(),
                backlog,
            }),
            _ => None,
        };
        (queues, backlog)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::{MapCommand, NewSession, SessionKind};
    use crate::store::StoreOptions;

    /// Registers a FIXED session and routes its login to `hook`: one pending delivery.
    async fn one_pending_delivery(store: &Store, id: &str) {
        let session = NewSession {
            realm: "acme".to_owned(),
            external_id: id.to_owned(),
            kind: SessionKind::Fixed,
            parent_id: None,
            idp_session_id: None,
            idp_client_session_id: None,
            user_id: None,
            system: None,
            delegated_by: None,
            attributes: Default::default(),
            expires_at: None,
        };
        store
            .map(MapCommand {
                session,
                origin_system: None,
                inherit_from: None,
                audit: None,
            })
            .await
            .unwrap();
        let routed = store
            .fan_out(
                Arc::new(|_| vec!["hook".to_owned()]),
                Arc::new(|_: &[(String, String)]| true),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(routed.deliveries, 1);
    }

    #[tokio::test]
    async fn a_reading_serves_scrapes_until_it_is_a_second_old() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("g.db").display());
        let store = Store::connect(&StoreOptions::new(url)).await.unwrap();
        store.migrate().await.unwrap();
        let readings = GaugeReadings::default();
        let (queues, backlog) = readings.read(&store).await;
        assert_eq!(queues, Some(BTreeMap::new()));
        assert_eq!(backlog.unwrap().oldest_waiting_ms, None);

        // A delivery queued within the reading's second is not counted yet...
        let read_at = Instant::now();
        one_pending_delivery(&store, "s1").await;
        let (queues, _) = readings.read(&store).await;
        if read_at.elapsed() < READING_TTL {
            assert_eq!(queues, Some(BTreeMap::new()), "served from the reading");
        }
        // ...and is once the reading is older than that.
        tokio::time::sleep(READING_TTL).await;
        let (queues, backlog) = readings.read(&store).await;
        assert_eq!(queues.unwrap()["hook"].pending, 1);
        assert!(backlog.unwrap().oldest_waiting_ms.is_some());
    }
}
