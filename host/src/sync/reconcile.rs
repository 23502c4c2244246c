//! Reconciliation (anti-entropy): walks a realm's live PARENTs mapped to Keycloak sessions in
//! batches, asks Keycloak which sessions their users still have, and ends what is mapped to a
//! session Keycloak no longer has — reason `reconciled`, cascading like an IdP logout, with
//! `originSystem` = the realm's IdP system so the Keycloak connector is not asked to end what
//! Keycloak already ended. This repairs events and logouts that never arrived. Nothing is ended
//! on an error or on an answer that could mean something else. Knows no HTTP routing; Keycloak
//! is reached through `oidc::keycloak_admin`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::idp_events;
use super::sessions::{SessionError, SessionService};
use crate::domain::Session;
use crate::oidc::keycloak_admin::{KeycloakAdmin, UserSessions};
use crate::telemetry::metrics::ReconcileMetrics;

/// The audit actor of the reconciler.
pub const RECONCILE_ACTOR: &str = "lockstep:reconciler";

/// What Keycloak said about one user, as the comparison needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The user's sessions.
    Sessions(HashSet<String>),
    /// Keycloak does not know the user.
    NoSuchUser,
    /// No usable answer (5xx, timeout, refused credentials, ...).
    Failed,
}

/// A live PARENT as the comparison sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its external id.
    pub external_id: String,
    /// The Keycloak session it is mapped to.
    pub sid: String,
    /// The user to ask Keycloak about.
    pub user_id: Option<String>,
    /// The user id came from Keycloak (the PARENT is the mirror `keycloak:{sid}`), so it is
    /// surely a Keycloak user id; an application may have mapped a user name or its own id.
    pub user_from_idp: bool,
}

impl Candidate {
    /// The candidate for a live PARENT; `None` for a session with no IdP session.
    pub fn of(session: &Session, idp_system: &str) -> Option<Candidate> {
        let sid = session.idp_session_id.clone()?;
        let user_from_idp = session.system.as_deref() == Some(idp_system)
            && session.external_id == idp_events::mirror_id(idp_system, &sid);
        Some(Candidate {
            external_id: session.external_id.clone(),
            user_id: session.user_id.clone().filter(|u| !u.is_empty()),
            sid,
            user_from_idp,
        })
    }
}

/// What one batch's answers decide.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Keycloak sessions that are gone, with the PARENTs (of the batch) mapped to them.
    pub gone: BTreeMap<String, Vec<String>>,
    /// PARENTs whose Keycloak session Keycloak still has.
    pub alive: usize,
    /// PARENTs left alone: no user to ask about, a failed call, or only answers that could
    /// mean something else (an application's user id that Keycloak does not know).
    pub unsure: usize,
}

/// Decides, per Keycloak session, from the batch's PARENTs and Keycloak's answers about their
/// users. A session is gone only when no answer lists it, no call about it failed, and at
/// least one answer is sure it is absent: a user Keycloak lists without it, or a Keycloak
/// user id (from the mirror) that Keycloak no longer knows.
pub fn plan(candidates: &[Candidate], answers: &HashMap<String, Answer>) -> Plan {
    let mut by_sid: BTreeMap<&str, Vec<&Candidate>> = BTreeMap::new();
    for c in candidates {
        by_sid.entry(c.sid.as_str()).or_default().push(c);
    }
    let mut out = Plan::default();
    for (sid, group) in by_sid {
        let (mut alive, mut failed, mut absent) = (false, false, false);
        for c in &group {
            let Some(user) = &c.user_id else { continue };
            match answers.get(user) {
                Some(Answer::Sessions(ids)) if ids.contains(sid) => alive = true,
                Some(Answer::Sessions(_)) => absent = true,
                Some(Answer::NoSuchUser) => absent |= c.user_from_idp,
                Some(Answer::Failed) | None => failed = true,
            }
        }
        if alive {
            out.alive += group.len();
        } else if absent && !failed {
            out.gone.insert(
                sid.to_owned(),
                group.iter().map(|c| c.external_id.clone()).collect(),
            );
        } else {
            out.unsure += group.len();
        }
    }
    out
}

/// A Keycloak session found gone.
#[derive(Clone, Debug)]
pub struct Gone {
    /// Its id.
    pub sid: String,
    /// The PARENTs mapped to it when it was found gone.
    pub parents: Vec<String>,
    /// Every session ended (empty on a dry run, or when another change ended them first).
    pub ended: Vec<Session>,
}

/// What a pass did.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    /// PARENTs compared with a sure answer.
    pub checked: usize,
    /// PARENTs left alone (see [`Plan::unsure`]).
    pub unsure: usize,
    /// Calls to Keycloak that failed.
    pub errors: usize,
    /// Calls to Keycloak made, token requests included.
    pub calls: u64,
    /// Keycloak sessions found gone, in the order found.
    pub gone: Vec<Gone>,
    /// Why the pass stopped early (refused credentials, missing role): the rest of the
    /// realm was not looked at.
    pub stopped: Option<String>,
}

/// Failures that end a pass (Keycloak's errors do not: they are counted and skipped).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading or ending sessions failed.
    #[error(transparent)]
    Sessions(#[from] SessionError),
}

/// Reconciles one realm.
#[derive(Clone)]
pub struct Reconciler {
    sessions: SessionService,
    admin: Arc<KeycloakAdmin>,
    metrics: Option<Arc<ReconcileMetrics>>,
}

impl Reconciler {
    /// A reconciler of the realm `admin` is set up for.
    pub fn new(sessions: SessionService, admin: Arc<KeycloakAdmin>) -> Self {
        Reconciler {
            sessions,
            admin,
            metrics: None,
        }
    }

    /// Counts passes in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<ReconcileMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        &self.admin.settings().realm
    }

    /// One pass over every live PARENT mapped to a Keycloak session. `dry_run`: decide, end
    /// nothing.
    pub async fn pass(&self, dry_run: bool) -> Result<PassReport, ReconcileError> {
        let calls_before = self.admin.calls();
        let result = self.walk(dry_run).await;
        if let (Some(m), Ok(report)) = (&self.metrics, &result) {
            m.pass(
                report.checked as u64,
                report.unsure as u64,
                report.errors as u64,
                report.gone.iter().map(|g| g.ended.len() as u64).sum(),
                self.admin.calls() - calls_before,
                report.stopped.is_none(),
            );
        }
        result.map(|mut r| {
            r.calls = self.admin.calls() - calls_before;
            r
        })
    }

    async fn walk(&self, dry_run: bool) -> Result<PassReport, ReconcileError> {
        let realm = self.realm().to_owned();
        let idp_system = self.sessions.idp_system(&realm);
        let batch = i64::from(self.admin.settings().batch);
        let mut report = PassReport::default();
        let mut after = 0;
        while report.stopped.is_none() {
            let parents = self
                .sessions
                .store()
                .live_idp_parents(&realm, after, batch)
                .await
                .map_err(SessionError::from)?;
            let Some(last) = parents.last() else { break };
            after = last.seq;
            let candidates: Vec<Candidate> = parents
                .iter()
                .filter_map(|s| Candidate::of(s, &idp_system))
                .collect();
            let users: BTreeSet<&str> = candidates
                .iter()
                .filter_map(|c| c.user_id.as_deref())
                .collect();
            let mut answers = HashMap::with_capacity(users.len());
            for user in users {
                let answer = match self.admin.user_sessions(user).await {
                    Ok(UserSessions::Listed(ids)) => Answer::Sessions(ids),
                    Ok(UserSessions::NoSuchUser) => Answer::NoSuchUser,
                    Err(e) => {
                        report.errors += 1;
                        tracing::warn!(%realm, error = %e, "reconcile: no answer about a user; their sessions are left alone");
                        if e.stops_pass() {
                            report.stopped = Some(e.to_string());
                            break;
                        }
                        Answer::Failed
                    }
                };
                answers.insert(user.to_owned(), answer);
            }
            // Users not asked because the pass stopped have no answer: unsure.
            let plan = plan(&candidates, &answers);
            report.checked += plan.alive + plan.gone.values().map(Vec::len).sum::<usize>();
            report.unsure += plan.unsure;
            for (sid, parents) in plan.gone {
                let ended = if dry_run {
                    Vec::new()
                } else {
                    self.sessions
                        .end_reconciled(&realm, &sid, parents.len())
                        .await?
                };
                report.gone.push(Gone {
                    sid,
                    parents,
                    ended,
                });
            }
        }
        Ok(report)
    }
}

/// Runs a pass every `interval` (counted from the end of the previous one) until `shutdown`
/// turns true; the first pass comes one interval after the start. A failed pass is logged
/// and tried again at the next.
pub async fn run(reconciler: Reconciler, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let realm = reconciler.realm().to_owned();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        // A pass is a series of short transactions: dropping it between two is harmless.
        let result = tokio::select! {
            r = reconciler.pass(false) => r,
            _ = shutdown.changed() => return,
        };
        match result {
            Ok(r) => {
                let ended: usize = r.gone.iter().map(|g| g.ended.len()).sum();
                if let Some(why) = &r.stopped {
                    tracing::error!(%realm, reason = %why, "reconcile pass stopped");
                }
                if ended > 0 || r.errors > 0 {
                    tracing::info!(%realm, checked = r.checked, gone = r.gone.len(), ended, unsure = r.unsure, errors = r.errors, calls = r.calls, "reconcile pass");
                } else {
                    tracing::debug!(%realm, checked = r.checked, unsure = r.unsure, calls = r.calls, "reconcile pass");
                }
            }
            Err(e) => {
                tracing::warn!(%realm, error = %e, "reconcile pass failed; trying again next interval")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(id: &str, sid: &str, user: Option<&str>) -> Candidate {
        Candidate {
            external_id: id.into(),
            sid: sid.into(),
            user_id: user.map(Into::into),
            user_from_idp: false,
        }
    }

    fn mirror(sid: &str, user: &str) -> Candidate {
        Candidate {
            external_id: format!("keycloak:{sid}"),
            sid: sid.into(),
            user_id: Some(user.into()),
            user_from_idp: true,
        }
    }

    fn listed(ids: &[&str]) -> Answer {
        Answer::Sessions(ids.iter().map(|s| s.to_string()).collect())
    }

    fn answers(list: &[(&str, Answer)]) -> HashMap<String, Answer> {
        list.iter()
            .map(|(u, a)| (u.to_string(), a.clone()))
            .collect()
    }

    fn gone(list: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        list.iter()
            .map(|(sid, ids)| (sid.to_string(), ids.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn a_session_keycloak_no_longer_lists_is_gone_and_a_listed_one_alive() {
        let c = [
            app("p1", "s1", Some("u1")),
            app("p2", "s2", Some("u1")),
            mirror("s2", "u1"),
        ];
        let p = plan(&c, &answers(&[("u1", listed(&["s2", "s9"]))]));
        assert_eq!(p.gone, gone(&[("s1", &["p1"])]));
        assert_eq!((p.alive, p.unsure), (2, 0));
    }

    #[test]
    fn errors_and_missing_answers_end_nothing() {
        let c = [
            app("p1", "s1", Some("u1")),
            app("p2", "s2", Some("u2")),
            mirror("s2", "u2"),
        ];
        for a in [
            answers(&[("u1", Answer::Failed), ("u2", Answer::Failed)]),
            answers(&[]),
        ] {
            let p = plan(&c, &a);
            assert_eq!(p.gone, BTreeMap::new(), "{a:?}");
            assert_eq!((p.alive, p.unsure), (0, 3));
        }
    }

    #[test]
    fn one_failed_call_about_a_session_keeps_it_even_if_another_says_absent() {
        // The application mapped s1 with its own user id, the mirror with Keycloak's.
        let c = [app("p1", "s1", Some("alice")), mirror("s1", "kc-uuid")];
        let p = plan(
            &c,
            &answers(&[("alice", Answer::Failed), ("kc-uuid", listed(&[]))]),
        );
        assert!(p.gone.is_empty());
        assert_eq!(p.unsure, 2);
        // Any answer that lists it wins over every other.
        let p = plan(
            &c,
            &answers(&[("alice", listed(&[])), ("kc-uuid", listed(&["s1"]))]),
        );
        assert!(p.gone.is_empty());
        assert_eq!(p.alive, 2);
    }

    #[test]
    fn an_unknown_user_means_gone_only_when_keycloak_gave_the_id() {
        let c = [app("p1", "s1", Some("alice")), app("p3", "s3", Some("bob"))];
        let a = answers(&[("alice", Answer::NoSuchUser), ("bob", Answer::NoSuchUser)]);
        let p = plan(&c, &a);
        assert!(
            p.gone.is_empty(),
            "an application's user id may not be Keycloak's"
        );
        assert_eq!(p.unsure, 2);
        // The mirror's user id is Keycloak's own: the user was deleted, with its sessions.
        let c = [app("p1", "s1", Some("alice")), mirror("s1", "kc-uuid")];
        let p = plan(
            &c,
            &answers(&[
                ("alice", Answer::NoSuchUser),
                ("kc-uuid", Answer::NoSuchUser),
            ]),
        );
        assert_eq!(p.gone, gone(&[("s1", &["p1", "keycloak:s1"])]));
        // An application's user that Keycloak does not know, beside a sure "absent".
        let p = plan(
            &c,
            &answers(&[
                ("alice", Answer::NoSuchUser),
                ("kc-uuid", listed(&["other"])),
            ]),
        );
        assert_eq!(p.gone.len(), 1);
    }

    #[test]
    fn a_parent_without_a_user_cannot_be_checked() {
        let p = plan(&[app("p1", "s1", None)], &answers(&[]));
        assert!(p.gone.is_empty());
        assert_eq!(p.unsure, 1);
    }

    #[test]
    fn only_the_mirror_of_the_realm_idp_counts_as_keycloak_given() {
        let now = chrono::Utc::now();
        let mut s = Session {
            seq: 1,
            realm: "acme".into(),
            external_id: "keycloak:s1".into(),
            kind: crate::domain::SessionKind::Parent,
            parent_id: None,
            idp_session_id: Some("s1".into()),
            idp_client_session_id: None,
            user_id: Some("u".into()),
            system: Some("keycloak".into()),
            delegated_by: None,
            status: crate::domain::SessionStatus::Active,
            end_reason: None,
            attributes: Default::default(),
            expires_at: None,
            created_at: now,
            updated_at: now,
        };
        assert!(Candidate::of(&s, "keycloak").unwrap().user_from_idp);
        assert!(!Candidate::of(&s, "sso").unwrap().user_from_idp);
        s.external_id = "keycloak:other".into();
        assert!(!Candidate::of(&s, "keycloak").unwrap().user_from_idp);
        s.idp_session_id = None;
        assert!(Candidate::of(&s, "keycloak").is_none());
    }
}
