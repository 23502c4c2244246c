//! The session-mapping store: SQLite (embedded default, one writer thread with group commit)
//! and PostgreSQL (pooled transactions, for more than one instance). It owns the schema,
//! migrations and every SQL statement; it knows nothing of HTTP.

pub mod audit;
pub mod connectors;
pub mod deliveries;
mod ops;
pub mod overview;
mod postgres;
pub mod receipts;
mod row;
mod sqlite;
pub mod ssf;

use std::str::FromStr;
use std::time::Duration;

use std::sync::Arc;

use crate::domain::{
    AuditEntry, AuditOutcome, DestroyCommand, DestroyTarget, IdpCommand, IdpOutcome, MapCommand,
    ProblemCode, Session, SessionKind, SessionStatus, SyncEvent,
};
use audit::{AuditQuery, AuditRow};
use deliveries::{
    AttemptRecord, AttemptRow, ClaimedDelivery, DeliveryQuery, DeliveryRow, FanOut, LaneClaim,
    ReplayTarget,
};
use postgres::Ops as PgOps;
use sqlite::Ops as SqliteOps;

/// Decides which connectors receive an event (the sync engine's routing rule).
pub type Route = Arc<dyn Fn(&SyncEvent) -> Vec<String> + Send + Sync>;

/// Whether this instance's connectors account for every uploaded connector (name, version)
/// the database holds; read in the fan-out's transaction after its batch.
pub type Gate = Arc<GateFn>;

/// The check behind a [`Gate`].
pub type GateFn = dyn Fn(&[(String, String)]) -> bool + Send + Sync;

pub use sqlite::Durability;

/// Store failures. Domain refusals are distinct variants so the API can map them to 4xx.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `(realm, external_id)` is already taken (decided by the unique constraint).
    #[error("session {0:?} already exists in this realm")]
    AlreadyExists(String),
    /// The session named in a destroy does not exist in the realm.
    #[error("session {0:?} not found in this realm")]
    NotFound(String),
    /// A CHILD names a parent that does not exist in the realm.
    #[error("parent session {0:?} not found in this realm")]
    ParentNotFound(String),
    /// A CHILD names a parent that has ended.
    #[error("parent session {id:?} is {status}, not ACTIVE")]
    ParentNotActive {
        /// The parent's external id.
        id: String,
        /// Its current status.
        status: SessionStatus,
    },
    /// A logout token id was seen before (back-channel logout replay).
    #[error("logout token {0:?} was already used")]
    Replayed(String),
    /// A destroy named a session of the wrong kind for that route.
    #[error("{0}")]
    WrongKind(String),
    /// A destroy would end more sessions than `[limits] max_cascade` allows; nothing changed.
    #[error(
        "destroying {target:?} would end at least {sessions} sessions; the limit is {limit} ([limits] max_cascade)"
    )]
    CascadeTooLarge {
        /// What the caller asked to destroy.
        target: String,
        /// Sessions the destroy would have ended, counted up to one past the limit.
        sessions: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A tree holds more sessions than `[limits] max_tree` allows one read to return.
    #[error(
        "the tree of {target:?} holds more than {limit} sessions, the most one read returns \
         ([limits] max_tree); list its sessions page by page instead (GET external-sessions \
         with keycloakSessionId or userId)"
    )]
    TreeTooLarge {
        /// The session asked about.
        target: String,
        /// The configured limit.
        limit: usize,
    },
    /// The database URL is not one this build understands.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    /// A row holds a value the code cannot interpret.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A writer is gone (shutting down or crashed): the SQLite writer thread, or the tasks
    /// committing guarded destroys together on PostgreSQL.
    #[error("the store is shutting down")]
    Unavailable,
    /// Any database failure.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A failure on the SQLite writer thread's connection.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// Migrations failed.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// The problem code of a domain refusal (a change or read the data does not allow);
    /// `None` for failures that are not the caller's doing. The API answers with it, and the
    /// audit log records it when [`ProblemCode::audited`] says so.
    pub fn refusal(&self) -> Option<ProblemCode> {
        match self {
            StoreError::AlreadyExists(_) => Some(ProblemCode::AlreadyExists),
            StoreError::NotFound(_) => Some(ProblemCode::NotFound),
            StoreError::ParentNotFound(_) => Some(ProblemCode::ParentNotFound),
            StoreError::ParentNotActive { .. } => Some(ProblemCode::ParentNotActive),
            StoreError::WrongKind(_) => Some(ProblemCode::WrongKind),
            StoreError::CascadeTooLarge { .. } => Some(ProblemCode::CascadeTooLarge),
            StoreError::TreeTooLarge { .. } => Some(ProblemCode::TreeTooLarge),
            StoreError::Replayed(_) => Some(ProblemCode::DuplicateEvent),
            StoreError::UnsupportedUrl(_)
            | StoreError::Corrupt(_)
            | StoreError::Unavailable
            | StoreError::Database(_)
            | StoreError::Sqlite(_)
            | StoreError::Migrate(_) => None,
        }
    }

    /// The code the audit log records for this error: a refusal of a change.
    pub fn refusal_code(&self) -> Option<ProblemCode> {
        self.refusal().filter(|code| code.audited())
    }
}

/// Result alias for store calls.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Filters of the cursor-paginated session query (`GET .../external-sessions`).
#[derive(Clone, Debug, Default)]
pub struct SessionQuery {
    /// Match `idp_session_id`.
    pub idp_session_id: Option<String>,
    /// Match `idp_client_session_id`.
    pub idp_client_session_id: Option<String>,
    /// Match `user_id`.
    pub user_id: Option<String>,
    /// Match `status`.
    pub status: Option<SessionStatus>,
    /// Match `system`.
    pub system: Option<String>,
    /// Only rows after this sequence number.
    pub after: Option<i64>,
    /// Page size.
    pub limit: u32,
}

/// One page of query results.
#[derive(Clone, Debug)]
pub struct Page {
    /// The rows, in sequence order.
    pub items: Vec<Session>,
    /// Sequence number to continue after, when more rows may follow.
    pub next_after: Option<i64>,
}

/// Cuts rows read with one more than a page (`limit + 1`) to the page, and answers the key of
/// its last row when that extra row showed that another page follows.
pub fn split_page<T>(
    mut rows: Vec<T>,
    limit: usize,
    key: impl Fn(&T) -> i64,
) -> (Vec<T>, Option<i64>) {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more { rows.last().map(key) } else { None };
    (rows, next)
}

/// Connection settings.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// `sqlite://PATH` or `postgres://...`.
    pub url: String,
    /// SQLite commit durability.
    pub durability: Durability,
    /// Pool size (PostgreSQL connections, or SQLite readers).
    pub max_connections: u32,
    /// How long a caller waits for a pooled connection.
    pub acquire_timeout: Duration,
}

impl StoreOptions {
    /// Options with defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        StoreOptions {
            url: url.into(),
            durability: Durability::Normal,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The backend in use. Cloning is cheap (pools and channels are shared).
#[derive(Clone)]
pub enum Store {
    /// Embedded SQLite.
    Sqlite(sqlite::SqliteStore),
    /// PostgreSQL.
    Postgres(postgres::PgStore),
}

impl Store {
    /// Opens the database named by `opts.url`, creating a SQLite file if needed.
    /// Does not migrate; call [`Store::migrate`].
    pub async fn connect(opts: &StoreOptions) -> Result<Self> {
        let url = opts.url.as_str();
        if url.starts_with("sqlite:") {
            Ok(Store::Sqlite(sqlite::SqliteStore::open(opts).await?))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Store::Postgres(postgres::PgStore::open(opts).await?))
        } else {
            Err(StoreError::UnsupportedUrl(opts.url.clone()))
        }
    }

    /// Applies pending migrations of this backend.
    pub async fn migrate(&self) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.migrate().await,
            Store::Postgres(p) => p.migrate().await,
        }
    }

    /// Registers a session and its `login` event in one transaction.
    pub async fn map(&self, cmd: MapCommand) -> Result<Session> {
        match self {
            Store::Sqlite(s) => s.map(cmd).await,
            Store::Postgres(p) => p.map(cmd).await,
        }
    }

    /// Ends the targeted sessions and their trees, with `logout` events, in one transaction.
    /// Returns every session that changed.
    pub async fn destroy(&self, cmd: DestroyCommand) -> Result<Vec<Session>> {
        match self {
            Store::Sqlite(s) => s.destroy(cmd).await,
            Store::Postgres(p) => p.destroy(cmd).await,
        }
    }

    /// Applies an identity-provider event (and remembers its id) in one transaction.
    pub async fn apply_idp(&self, cmd: IdpCommand) -> Result<IdpOutcome> {
        match self {
            Store::Sqlite(s) => s.apply_idp(cmd).await,
            Store::Postgres(p) => p.apply_idp(cmd).await,
        }
    }

    /// Up to `limit` live sessions past their `expires_at` at `now`: `(realm, external_id)`,
    /// soonest first.
    pub async fn expired(&self, now: i64, limit: i64) -> Result<Vec<(String, String)>> {
        match self {
            Store::Sqlite(s) => SqliteOps::expired(&mut *s.reader().await?, now, limit).await,
            Store::Postgres(p) => PgOps::expired(&mut *p.conn().await?, now, limit).await,
        }
    }

    /// Up to `limit` live PARENTs mapped to an IdP session, after sequence number `after`,
    /// in sequence order (the reconciler walks them in batches).
    pub async fn live_idp_parents(
        &self,
        realm: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Session>> {
        match self {
            Store::Sqlite(s) => {
                SqliteOps::live_idp_parents(&mut *s.reader().await?, realm, after, limit).await
            }
            Store::Postgres(p) => {
                PgOps::live_idp_parents(&mut *p.conn().await?, realm, after, limit).await
            }
        }
    }

    /// One session.
    pub async fn get(&self, realm: &str, external_id: &str) -> Result<Option<Session>> {
        match self {
            Store::Sqlite(s) => SqliteOps::get(&mut *s.reader().await?, realm, external_id).await,
            Store::Postgres(p) => PgOps::get(&mut *p.conn().await?, realm, external_id).await,
        }
    }

    /// The whole tree containing `external_id`, root first, or `None` if it does not exist;
    /// [`StoreError::TreeTooLarge`] when it holds more than `max` sessions.
    pub async fn tree(
        &self,
        realm: &str,
        external_id: &str,
        max: Option<usize>,
    ) -> Result<Option<Vec<Session>>> {
        match self {
            Store::Sqlite(s) => {
                SqliteOps::tree(&mut *s.reader().await?, realm, external_id, max).await
            }
            Store::Postgres(p) => p.tree(realm, external_id, max).await,
        }
    }

    /// Filtered, cursor-paginated listing.
    pub async fn query(&self, realm: &str, q: &SessionQuery) -> Result<Page> {
        match self {
            Store::Sqlite(s) => SqliteOps::query(&mut *s.reader().await?, realm, q).await,
            Store::Postgres(p) => PgOps::query(&mut *p.conn().await?, realm, q).await,
        }
    }

    /// Cheap liveness probe of the database.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.ping().await,
            Store::Postgres(p) => p.ping().await,
        }
    }

    /// Stops background work (the SQLite writer) after finishing queued writes.
    pub async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.close().await,
            Store::Postgres(p) => p.close().await,
        }
    }

    /// Signalled after commits that wrote outbox events (wakes the dispatcher).
    pub fn committed(&self) -> Arc<tokio::sync::Notify> {
        match self {
            Store::Sqlite(s) => s.committed(),
            Store::Postgres(p) => p.committed(),
        }
    }

    /// Turns new outbox events into deliveries for the connectors `route` names.
    /// Returns what this round routed, or `None` (nothing changed) when
    /// `gate` says this instance has not yet loaded a connector upload the database holds:
    /// routing now would leave that connector out of events committed after its upload.
    pub async fn fan_out(&self, route: Route, gate: Gate) -> Result<Option<FanOut>> {
        match self {
            Store::Sqlite(s) => s.fan_out(route, gate).await,
            Store::Postgres(p) => p.fan_out(&*route, &*gate).await,
        }
    }

    /// Leases up to `lane.limit` of its connector's due deliveries until `lane.lease_until`,
    /// in one statement, in id order.
    pub async fn claim(&self, lane: LaneClaim) -> Result<Vec<ClaimedDelivery>> {
        if lane.limit <= 0 {
            return Ok(Vec::new());
        }
        match self {
            Store::Sqlite(s) => s.claim(lane).await,
            Store::Postgres(p) => p.claim(&lane).await,
        }
    }

    /// Records finished attempts, in one transaction.
    pub async fn record(&self, records: Vec<AttemptRecord>) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.record(records).await,
            Store::Postgres(p) => p.record(&records).await,
        }
    }

    /// Waits for deliveries created by other instances (PostgreSQL `LISTEN`) and signals
    /// `wake` for each announcement, until `shutdown`. A lost connection is re-established
    /// with back-off; meanwhile the dispatcher's poll still finds the work. SQLite has one
    /// instance: returns when `shutdown` turns true.
    pub async fn watch_deliveries(
        &self,
        wake: Arc<tokio::sync::Notify>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        match self {
            Store::Sqlite(_) => drop(shutdown.wait_for(|s| *s).await),
            Store::Postgres(p) => p.watch_deliveries(wake, shutdown).await,
        }
    }

    /// After a restart of the only instance (SQLite), its old leases are void.
    pub async fn release_leases(&self) -> Result<u64> {
        match self {
            Store::Sqlite(s) => s.release_leases().await,
            // Other instances may hold live leases; expired ones are reclaimed by `claim`.
            Store::Postgres(_) => Ok(0),
        }
    }

    /// Re-queues dead letters, with their audit record; returns how many.
    pub async fn replay(&self, target: ReplayTarget, audit: Option<AuditEntry>) -> Result<u64> {
        match self {
            Store::Sqlite(s) => s.replay(target, audit).await,
            Store::Postgres(p) => p.replay(&target, audit.as_ref()).await,
        }
    }

    /// Writes one audit record on its own: refusals (the refused operation's transaction was
    /// rolled back, its record with it) and actions that changed nothing in the database.
    pub async fn record_audit(&self, entry: AuditEntry, outcome: AuditOutcome) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.record_audit(entry, outcome).await,
            Store::Postgres(p) => p.record_audit(&entry, outcome).await,
        }
    }

    /// Audit records, newest first.
    pub async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRow>> {
        match self {
            Store::Sqlite(s) => SqliteOps::list_audit(&mut *s.reader().await?, q).await,
            Store::Postgres(p) => PgOps::list_audit(&mut *p.conn().await?, q).await,
        }
    }

    /// Deletes up to `limit` audit records older than `before_ms` (one short transaction);
    /// how many.
    pub async fn purge_audit(&self, before_ms: i64, limit: i64) -> Result<u64> {
        match self {
            Store::Sqlite(s) => s.purge_audit(before_ms, limit).await,
            Store::Postgres(p) => p.purge_audit(before_ms, limit).await,
        }
    }

    /// Filtered deliveries, by id.
    pub async fn list_deliveries(&self, q: &DeliveryQuery) -> Result<Vec<DeliveryRow>> {
        match self {
            Store::Sqlite(s) => SqliteOps::list_deliveries(&mut *s.reader().await?, q).await,
            Store::Postgres(p) => PgOps::list_deliveries(&mut *p.conn().await?, q).await,
        }
    }

    /// One delivery with its attempts.
    pub async fn get_delivery(&self, id: i64) -> Result<Option<(DeliveryRow, Vec<AttemptRow>)>> {
        match self {
            Store::Sqlite(s) => SqliteOps::get_delivery(&mut *s.reader().await?, id).await,
            Store::Postgres(p) => PgOps::get_delivery(&mut *p.conn().await?, id).await,
        }
    }

    /// Deliveries of some sessions of a realm.
    pub async fn session_deliveries(
        &self,
        realm: &str,
        external_ids: &[String],
    ) -> Result<Vec<DeliveryRow>> {
        match self {
            Store::Sqlite(s) => {
                SqliteOps::session_deliveries(&mut *s.reader().await?, realm, external_ids).await
            }
            Store::Postgres(p) => {
                PgOps::session_deliveries(&mut *p.conn().await?, realm, external_ids).await
            }
        }
    }

    /// One session and its logout events, deliveries and confirmations (termination
    /// receipt), from one snapshot; `None` when the session does not exist in the realm.
    pub async fn session_receipt(
        &self,
        realm: &str,
        external_id: &str,
    ) -> Result<Option<(Session, receipts::LogoutRecords)>> {
        match self {
            Store::Sqlite(s) => {
                SqliteOps::session_receipt(&mut *s.reader().await?, realm, external_id).await
            }
            Store::Postgres(p) => {
                PgOps::session_receipt(&mut *p.conn().await?, realm, external_id).await
            }
        }
    }

    /// One page of a user's sessions (`q.user_id`) with their logout records, and totals
    /// over all of that user's sessions in the realm, from one snapshot.
    pub async fn user_receipts(
        &self,
        realm: &str,
        q: &SessionQuery,
    ) -> Result<(Page, receipts::LogoutRecords, receipts::UserTotals)> {
        match self {
            Store::Sqlite(s) => SqliteOps::user_receipts(&mut *s.reader().await?, realm, q).await,
            Store::Postgres(p) => PgOps::user_receipts(&mut *p.conn().await?, realm, q).await,
        }
    }

    /// Stores (or replaces) an uploaded connector, with its audit record, and announces the
    /// change.
    pub async fn put_upload(
        &self,
        row: connectors::UploadRow,
        audit: Option<AuditEntry>,
    ) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.put_upload(row, audit).await,
            Store::Postgres(p) => p.put_upload(&row, audit.as_ref()).await,
        }
    }

    /// Removes an uploaded connector (and its enabled flag); whether it existed. The audit
    /// record is written only when it did (otherwise the caller records the refusal).
    pub async fn delete_upload(&self, name: &str, audit: Option<AuditEntry>) -> Result<bool> {
        match self {
            Store::Sqlite(s) => s.delete_upload(name.to_owned(), audit).await,
            Store::Postgres(p) => p.delete_upload(name, audit.as_ref()).await,
        }
    }

    /// One uploaded connector with its component bytes.
    pub async fn get_upload(&self, name: &str) -> Result<Option<connectors::UploadRow>> {
        match self {
            Store::Sqlite(s) => SqliteOps::get_upload(&mut *s.reader().await?, name).await,
            Store::Postgres(p) => PgOps::get_upload(&mut *p.conn().await?, name).await,
        }
    }

    /// Name and version of every uploaded connector.
    pub async fn upload_versions(&self) -> Result<Vec<(String, String)>> {
        match self {
            Store::Sqlite(s) => SqliteOps::upload_versions(&mut *s.reader().await?).await,
            Store::Postgres(p) => PgOps::upload_versions(&mut *p.conn().await?).await,
        }
    }

    /// Switches a connector on or off (for every instance), with its audit record, and
    /// announces the change.
    pub async fn set_enabled(
        &self,
        name: &str,
        enabled: bool,
        audit: Option<AuditEntry>,
    ) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.set_enabled(name.to_owned(), enabled, audit).await,
            Store::Postgres(p) => p.set_enabled(name, enabled, audit.as_ref()).await,
        }
    }

    /// Names of the connectors switched off.
    pub async fn disabled_connectors(&self) -> Result<Vec<String>> {
        match self {
            Store::Sqlite(s) => SqliteOps::disabled(&mut *s.reader().await?).await,
            Store::Postgres(p) => PgOps::disabled(&mut *p.conn().await?).await,
        }
    }

    /// Undelivered deliveries per connector and status, of every connector or of `only`.
    pub async fn queue_counts(
        &self,
        only: Option<&str>,
    ) -> Result<std::collections::BTreeMap<String, connectors::QueueCounts>> {
        match self {
            Store::Sqlite(s) => SqliteOps::queue_counts(&mut *s.reader().await?, only).await,
            Store::Postgres(p) => PgOps::queue_counts(&mut *p.conn().await?, only).await,
        }
    }

    /// Unrouted outbox events and the age of the oldest waiting event (`/metrics`).
    pub async fn backlog(&self) -> Result<connectors::Backlog> {
        match self {
            Store::Sqlite(s) => SqliteOps::backlog(&mut *s.reader().await?).await,
            Store::Postgres(p) => PgOps::backlog(&mut *p.conn().await?).await,
        }
    }

    /// Gives claimed deliveries back without an attempt, in one statement (PostgreSQL) or
    /// one transaction (SQLite) however many there are.
    pub async fn unlease(&self, ids: Vec<i64>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        match self {
            Store::Sqlite(s) => s.unlease(ids).await,
            Store::Postgres(p) => p.unlease(&ids).await,
        }
    }

    /// A listener for connector changes made by other instances (PostgreSQL only; a SQLite
    /// database has one instance).
    pub async fn listen_connectors(&self) -> Result<Option<sqlx::postgres::PgListener>> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(p) => p.listen_connectors().await.map(Some),
        }
    }

    /// Short backend name for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }
}

impl FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "normal" => Ok(Durability::Normal),
            "fsync" => Ok(Durability::Fsync),
            other => Err(format!("durability must be normal or fsync, got {other:?}")),
        }
    }
}

/// A destroy route names the kind it ends: destroy-parent a PARENT or FIXED root,
/// destroy-child a CHILD (both backends refuse the other with WRONG_KIND).
pub(crate) fn check_kind(target: &DestroyTarget, id: &str, kind: SessionKind) -> Result<()> {
    match (target, kind) {
        (DestroyTarget::Parent(_), SessionKind::Parent | SessionKind::Fixed)
        | (DestroyTarget::Child(_), SessionKind::Child) => Ok(()),
        (DestroyTarget::Parent(_), SessionKind::Child) => Err(StoreError::WrongKind(format!(
            "session {id:?} is a CHILD; use destroy-child"
        ))),
        (DestroyTarget::Child(_), other) => Err(StoreError::WrongKind(format!(
            "session {id:?} is a {other}; use destroy-parent"
        ))),
        (
            DestroyTarget::User(_)
            | DestroyTarget::IdpSession(_)
            | DestroyTarget::AllIdpSessions
            | DestroyTarget::Expired(_),
            _,
        ) => Ok(()),
    }
}

/// Milliseconds since the Unix epoch, the storage format of every timestamp.
pub(crate) fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
