//! Termination receipts: for an ended session, which connectors confirmed its logout, when
//! and with which connector version, and which are still pending or gave up. It owns the
//! rules (what counts as confirmed, when a receipt is complete) over what the store recorded;
//! it knows nothing of HTTP or SQL.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};

use super::sessions::{MAX_PAGE, SessionError};
use crate::domain::rules::{self, ValidationError};
use crate::domain::{Session, SessionStatus};
use crate::store::deliveries::{DeliveryRow, DeliveryStatus};
use crate::store::receipts::{LogoutRecords, UserTotals};
use crate::store::{SessionQuery, Store};

/// Where one connector stands with one logout event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirmation {
    /// The connector confirmed the logout.
    Delivered,
    /// Routed, not attempted yet.
    Pending,
    /// Attempted, failed, and due again.
    Retrying,
    /// Gave up (dead letter); a replay can still deliver it.
    Dead,
    /// Failed under the `log` policy and was dropped; a replay can still deliver it.
    Dropped,
}

impl Confirmation {
    /// The state of a delivery with this status after `attempts` attempts.
    pub fn of(status: DeliveryStatus, attempts: i32) -> Self {
        match status {
            DeliveryStatus::Delivered => Confirmation::Delivered,
            DeliveryStatus::Pending if attempts > 0 => Confirmation::Retrying,
            DeliveryStatus::Pending => Confirmation::Pending,
            DeliveryStatus::Dead => Confirmation::Dead,
            DeliveryStatus::Dropped => Confirmation::Dropped,
        }
    }
}

/// One connector's part in a logout.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectorReceipt {
    /// Delivery id (for `/admin/deliveries/{id}` and replay).
    pub delivery_id: i64,
    /// Connector name.
    pub connector: String,
    /// Where it stands.
    pub state: Confirmation,
    /// Attempts made (restarts at 0 after a replay).
    pub attempts: i32,
    /// When the connector confirmed (delivered only).
    pub confirmed_at: Option<DateTime<Utc>>,
    /// Version of the connector that confirmed (delivered), else of the last attempt.
    pub connector_version: Option<String>,
    /// When the next attempt is due (pending and retrying only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed (not for delivered ones).
    pub last_error: Option<String>,
}

/// One `logout` event of a session and the connectors it was routed to.
#[derive(Clone, Debug, PartialEq)]
pub struct LogoutReceipt {
    /// Stable event id (what connectors received).
    pub event_id: String,
    /// When the session ended.
    pub occurred_at: DateTime<Utc>,
    /// The system the logout came from; connectors of that name are not sent their own
    /// change back (no echo), so they are not expected to confirm.
    pub origin_system: Option<String>,
    /// Whether the event was routed yet (until then, the connectors list is empty and the
    /// receipt cannot be complete).
    pub routed: bool,
    /// Every connector the event was routed to, by delivery id.
    pub connectors: Vec<ConnectorReceipt>,
    /// Connectors subscribed to this logout that are not sent it because they are its
    /// origin (no echo): listed, so a receipt never passes over a connector in silence.
    pub skipped: Vec<String>,
}

/// Counts of connector states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Every delivery counted.
    pub connectors: u64,
    /// Confirmed.
    pub delivered: u64,
    /// Not attempted yet.
    pub pending: u64,
    /// Failed, due again.
    pub retrying: u64,
    /// Dead letters.
    pub dead: u64,
    /// Dropped under the `log` policy.
    pub dropped: u64,
}

impl Tally {
    fn add(&mut self, state: Confirmation, n: u64) {
        self.connectors += n;
        *match state {
            Confirmation::Delivered => &mut self.delivered,
            Confirmation::Pending => &mut self.pending,
            Confirmation::Retrying => &mut self.retrying,
            Confirmation::Dead => &mut self.dead,
            Confirmation::Dropped => &mut self.dropped,
        } += n;
    }

    /// Whether every counted delivery is confirmed.
    pub fn all_delivered(&self) -> bool {
        self.delivered == self.connectors
    }
}

/// The termination receipt of one session.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionReceipt {
    /// The session as it stands.
    pub session: Session,
    /// Whether the session has ended (DESTROYED). ACTIVE has not; ORPHANED has not either:
    /// its owner has yet to end it, and no logout was sent for it.
    pub ended: bool,
    /// When it ended (its last change), when it has.
    pub ended_at: Option<DateTime<Utc>>,
    /// Its `logout` events (normally one), oldest first.
    pub logouts: Vec<LogoutReceipt>,
    /// Counts over every connector of every logout event.
    pub summary: Tally,
    /// The session has ended, its logout was routed, and every connector it was routed to
    /// confirmed it.
    pub complete: bool,
}

/// Counts over every session of a user in a realm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserTally {
    /// Sessions of the user.
    pub sessions: u64,
    /// Of which ended (DESTROYED).
    pub ended: u64,
    /// Of which ACTIVE.
    pub active: u64,
    /// Of which ORPHANED.
    pub orphaned: u64,
    /// Logout events not routed to connectors yet.
    pub unrouted: u64,
    /// Connector states over every logout delivery of the user's sessions.
    pub deliveries: Tally,
}

/// The receipts of a user's sessions, one page at a time, with totals over all of them.
#[derive(Clone, Debug, PartialEq)]
pub struct UserReceipts {
    /// The user.
    pub user_id: String,
    /// Receipts of this page's sessions, in creation order.
    pub sessions: Vec<SessionReceipt>,
    /// Counts over every session of the user (not only this page).
    pub totals: UserTally,
    /// The user has at least one session, every one has ended, and every logout of every
    /// one was routed and confirmed — over all pages.
    pub complete: bool,
    /// Position to continue after when more sessions follow.
    pub next_after: Option<i64>,
}

fn time(ms: i64) -> DateTime<Utc> {
    // Timestamps are written by this service from the clock; an impossible one reads as the
    // epoch rather than failing a whole receipt.
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn connector_receipt(d: DeliveryRow, confirmed: Option<(Option<String>, i64)>) -> ConnectorReceipt {
    let status = DeliveryStatus::parse(&d.status).unwrap_or(DeliveryStatus::Pending);
    let state = Confirmation::of(status, d.attempts);
    let delivered = state == Confirmation::Delivered;
    // The confirming attempt says when and with which version; the delivery row is the
    // fallback (it records the last attempt, which for a delivered one is the same).
    let (version, confirmed_at) = match confirmed {
        Some((version, at)) if delivered => (version.or(d.connector_version), Some(time(at))),
        _ => (
            d.connector_version,
            d.delivered_at.filter(|_| delivered).map(time),
        ),
    };
    ConnectorReceipt {
        delivery_id: d.id,
        connector: d.connector,
        state,
        attempts: d.attempts,
        confirmed_at,
        connector_version: version,
        next_attempt_at: matches!(state, Confirmation::Pending | Confirmation::Retrying)
            .then(|| time(d.next_attempt_at)),
        last_error: if delivered { None } else { d.last_error },
    }
}

/// Builds the receipts of `sessions` from their logout records (records of other sessions
/// are ignored). `subscribers` are the connectors subscribed to the realm's logouts whatever
/// their origin; those a logout's origin names were skipped by its fan-out (no echo).
pub fn assemble(
    sessions: Vec<Session>,
    records: LogoutRecords,
    subscribers: &[String],
) -> Vec<SessionReceipt> {
    let mut confirmations: HashMap<i64, (Option<String>, i64)> = HashMap::new();
    for c in records.confirmations {
        // The first confirmation counts (a redelivery may confirm again).
        confirmations
            .entry(c.delivery_id)
            .or_insert((c.connector_version, c.finished_at));
    }
    let mut by_event: HashMap<String, Vec<ConnectorReceipt>> = HashMap::new();
    for d in records.deliveries {
        let confirmed = confirmations.remove(&d.id);
        by_event
            .entry(d.event_id.clone())
            .or_default()
            .push(connector_receipt(d, confirmed));
    }
    let mut by_session: HashMap<String, Vec<LogoutReceipt>> = HashMap::new();
    for e in records.events {
        by_session
            .entry(e.external_id)
            .or_default()
            .push(LogoutReceipt {
                connectors: by_event.remove(&e.event_id).unwrap_or_default(),
                skipped: subscribers
                    .iter()
                    .filter(|name| e.origin_system.as_deref() == Some(name.as_str()))
                    .cloned()
                    .collect(),
                event_id: e.event_id,
                occurred_at: time(e.created_at),
                origin_system: e.origin_system,
                routed: e.fanned_out != 0,
            });
    }
    sessions
        .into_iter()
        .map(|session| {
            let logouts = by_session.remove(&session.external_id).unwrap_or_default();
            receipt(session, logouts)
        })
        .collect()
}

fn receipt(session: Session, logouts: Vec<LogoutReceipt>) -> SessionReceipt {
    let mut summary = Tally::default();
    for c in logouts.iter().flat_map(|l| &l.connectors) {
        summary.add(c.state, 1);
    }
    let ended = session.status == SessionStatus::Destroyed;
    let complete =
        ended && !logouts.is_empty() && logouts.iter().all(|l| l.routed) && summary.all_delivered();
    SessionReceipt {
        ended_at: ended.then_some(session.updated_at),
        session,
        ended,
        logouts,
        summary,
        complete,
    }
}

/// Turns the store's counts over a user's sessions into the user's totals and whether the
/// user is logged out everywhere.
pub fn user_tally(t: &UserTotals) -> (UserTally, bool) {
    let mut out = UserTally::default();
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    for (status, n) in &t.sessions_by_status {
        let n = count(*n);
        out.sessions += n;
        match status.parse::<SessionStatus>() {
            Ok(SessionStatus::Destroyed) => out.ended += n,
            Ok(SessionStatus::Active) => out.active += n,
            Ok(SessionStatus::Orphaned) => out.orphaned += n,
            // An unknown status is not an ended one.
            Err(_) => out.active += n,
        }
    }
    for (status, attempted, n) in &t.deliveries_by_status {
        let status = DeliveryStatus::parse(status).unwrap_or(DeliveryStatus::Pending);
        out.deliveries
            .add(Confirmation::of(status, *attempted), count(*n));
    }
    out.unrouted = count(t.unrouted_events);
    let complete = out.sessions > 0
        && out.ended == out.sessions
        && out.unrouted == 0
        && t.ended_without_event == 0
        && out.deliveries.all_delivered();
    (out, complete)
}

/// The receipt of one session; `None` when it does not exist in the realm.
pub async fn session_receipt(
    store: &Store,
    realm: &str,
    external_id: &str,
    subscribers: &[String],
) -> Result<Option<SessionReceipt>, SessionError> {
    rules::realm(realm)?;
    rules::id("externalId", external_id)?;
    let Some((session, records)) = store.session_receipt(realm, external_id).await? else {
        return Ok(None);
    };
    Ok(assemble(vec![session], records, subscribers).pop())
}

/// One page (`limit` 1–500, default [`USER_PAGE`]) of the receipts of a user's sessions,
/// after the position `after`, with totals over all of them.
pub async fn user_receipts(
    store: &Store,
    realm: &str,
    user_id: &str,
    after: Option<i64>,
    limit: Option<u32>,
    subscribers: &[String],
) -> Result<UserReceipts, SessionError> {
    rules::realm(realm)?;
    rules::id("userId", user_id)?;
    let limit = limit.unwrap_or(USER_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ValidationError(format!("limit must be 1-{MAX_PAGE}")).into());
    }
    let q = SessionQuery {
        user_id: Some(user_id.to_owned()),
        after,
        limit,
        ..SessionQuery::default()
    };
    let (page, records, totals) = store.user_receipts(realm, &q).await?;
    let (totals, complete) = user_tally(&totals);
    Ok(UserReceipts {
        user_id: user_id.to_owned(),
        sessions: assemble(page.items, records, subscribers),
        totals,
        complete,
        next_after: page.next_after,
    })
}

/// Sessions per page of a user's receipts when the caller does not say: the most a page may
/// hold (other listings default to 50), so that one call usually answers an auditor.
pub const USER_PAGE: u32 = MAX_PAGE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SessionKind;
    use crate::store::receipts::{ConfirmationRow, LogoutEventRow};

    fn session(id: &str, status: SessionStatus) -> Session {
        Session {
            seq: 1,
            realm: "acme".into(),
            external_id: id.into(),
            kind: SessionKind::Parent,
            parent_id: None,
            idp_session_id: Some("kc".into()),
            idp_client_session_id: None,
            user_id: Some("alice".into()),
            system: None,
            delegated_by: None,
            status,
            end_reason: None,
            attributes: Default::default(),
            expires_at: None,
            created_at: time(1_000),
            updated_at: time(2_000),
        }
    }

    fn event(id: &str, session: &str, routed: bool) -> LogoutEventRow {
        LogoutEventRow {
            outbox_id: 1,
            event_id: id.into(),
            external_id: session.into(),
            origin_system: Some("portal".into()),
            created_at: 2_000,
            fanned_out: i32::from(routed),
        }
    }

    fn delivery(id: i64, event: &str, connector: &str, status: &str, attempts: i32) -> DeliveryRow {
        DeliveryRow {
            id,
            event_id: event.into(),
            event_type: "logout".into(),
            connector: connector.into(),
            realm: "acme".into(),
            external_id: "p".into(),
            status: status.into(),
            attempts,
            next_attempt_at: 3_000,
            last_error: (status != "delivered").then(|| "HTTP 503".into()),
            connector_version: Some("v-last".into()),
            created_at: 2_000,
            updated_at: 2_500,
            delivered_at: (status == "delivered").then_some(2_400),
            delivered_started_at: None,
        }
    }

    #[test]
    fn pending_deliveries_are_retrying_once_attempted() {
        assert_eq!(
            Confirmation::of(DeliveryStatus::Pending, 0),
            Confirmation::Pending
        );
        assert_eq!(
            Confirmation::of(DeliveryStatus::Pending, 2),
            Confirmation::Retrying
        );
        assert_eq!(
            Confirmation::of(DeliveryStatus::Delivered, 1),
            Confirmation::Delivered
        );
    }

    #[test]
    fn a_receipt_is_complete_only_when_ended_routed_and_every_connector_confirmed() {
        let records = |status: &str| LogoutRecords {
            events: vec![event("e1", "p", true)],
            deliveries: vec![
                delivery(1, "e1", "billing", "delivered", 1),
                delivery(2, "e1", "legacy", status, 3),
            ],
            confirmations: vec![ConfirmationRow {
                delivery_id: 1,
                connector_version: Some("v-confirmed".into()),
                finished_at: 2_300,
            }],
        };
        let r = assemble(
            vec![session("p", SessionStatus::Destroyed)],
            records("dead"),
            &[],
        );
        let r = &r[0];
        assert!(r.ended && !r.complete);
        assert_eq!(r.ended_at, Some(time(2_000)));
        assert_eq!(r.summary.connectors, 2);
        assert_eq!((r.summary.delivered, r.summary.dead), (1, 1));
        let billing = &r.logouts[0].connectors[0];
        assert_eq!(billing.connector_version.as_deref(), Some("v-confirmed"));
        assert_eq!(billing.confirmed_at, Some(time(2_300)));
        assert_eq!(billing.last_error, None);
        let legacy = &r.logouts[0].connectors[1];
        assert_eq!(legacy.state, Confirmation::Dead);
        assert_eq!(legacy.last_error.as_deref(), Some("HTTP 503"));
        assert_eq!(legacy.next_attempt_at, None);

        let r = assemble(
            vec![session("p", SessionStatus::Destroyed)],
            records("delivered"),
            &[],
        );
        assert!(r[0].complete);
        // Without a confirming attempt row the delivery row still tells when.
        assert_eq!(
            r[0].logouts[0].connectors[1].confirmed_at,
            Some(time(2_400))
        );
    }

    #[test]
    fn unrouted_missing_or_live_logouts_are_never_complete() {
        let unrouted = LogoutRecords {
            events: vec![event("e1", "p", false)],
            ..LogoutRecords::default()
        };
        let r = assemble(vec![session("p", SessionStatus::Destroyed)], unrouted, &[]);
        assert!(r[0].ended && !r[0].complete);

        let nothing = assemble(
            vec![session("p", SessionStatus::Destroyed)],
            LogoutRecords::default(),
            &[],
        );
        assert!(!nothing[0].complete);

        // Routed to nobody (no connector subscribed): every subscribed connector confirmed.
        let nobody = LogoutRecords {
            events: vec![event("e1", "p", true)],
            ..LogoutRecords::default()
        };
        let r = assemble(vec![session("p", SessionStatus::Destroyed)], nobody, &[]);
        assert!(r[0].complete);

        for status in [SessionStatus::Active, SessionStatus::Orphaned] {
            let r = assemble(vec![session("p", status)], LogoutRecords::default(), &[]);
            assert!(!r[0].ended && !r[0].complete && r[0].ended_at.is_none());
        }
    }

    #[test]
    fn subscribed_connectors_named_as_origin_are_listed_as_skipped() {
        let records = LogoutRecords {
            events: vec![event("e1", "p", true)],
            deliveries: vec![delivery(1, "e1", "billing", "delivered", 1)],
            confirmations: vec![],
        };
        let subscribers = ["billing".to_owned(), "portal".to_owned()];
        let r = assemble(
            vec![session("p", SessionStatus::Destroyed)],
            records,
            &subscribers,
        );
        let logout = &r[0].logouts[0];
        assert_eq!(logout.origin_system.as_deref(), Some("portal"));
        assert_eq!(logout.skipped, ["portal"]);
        assert!(r[0].complete, "the origin ended the session itself");
    }

    #[test]
    fn a_user_is_complete_only_when_every_session_ended_and_confirmed() {
        let totals = UserTotals {
            sessions_by_status: vec![("DESTROYED".into(), 3)],
            deliveries_by_status: vec![("delivered".into(), 1, 6)],
            unrouted_events: 0,
            ended_without_event: 0,
        };
        let (t, complete) = user_tally(&totals);
        assert!(complete);
        assert_eq!((t.sessions, t.ended, t.deliveries.delivered), (3, 3, 6));

        let mut live = totals.clone();
        live.sessions_by_status.push(("ACTIVE".into(), 1));
        assert!(!user_tally(&live).1);
        let mut retrying = totals.clone();
        retrying.deliveries_by_status.push(("pending".into(), 1, 1));
        let (t, complete) = user_tally(&retrying);
        assert!(!complete);
        assert_eq!(t.deliveries.retrying, 1);
        let mut unrouted = totals.clone();
        unrouted.unrouted_events = 1;
        assert!(!user_tally(&unrouted).1);
        let mut silent = totals;
        silent.ended_without_event = 1;
        assert!(!user_tally(&silent).1);
        assert!(
            !user_tally(&UserTotals::default()).1,
            "no sessions proves nothing"
        );
    }
}
