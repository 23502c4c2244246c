//! Connector lifecycle: the one place that adds, replaces, removes, enables and disables
//! connectors, whatever asked for it (the watched directory, the admin API, or another
//! instance through the database). Every change is serialised by one lock, validated and
//! compiled *before* the switch, and published as one atomic swap of the registry, so calls
//! already running finish on the version they started with and the next claim sees the new
//! one. A refused change leaves the previous version serving.

mod cluster;
pub mod dir;
mod gauges;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::domain::AuditEntry;
use crate::runtime::cache::CacheOutcome;
use crate::runtime::manifest::{Manifest, ManifestError};
use crate::runtime::registry::{Entry, Registry, Source};
use crate::runtime::{LoadedConnector, Runtime, RuntimeError, version_of};
use crate::store::connectors::{QueueCounts, UploadRow};
use crate::store::{Store, StoreError, now_millis};
use crate::telemetry::metrics::{ConnectorGauge, ConnectorMetrics, FailedGauge, Metrics};

pub use cluster::spawn_cluster_sync;
pub use dir::spawn_watcher;

/// Largest component accepted through the admin API.
pub const MAX_COMPONENT_BYTES: usize = 64 * 1024 * 1024;
/// Largest manifest accepted through the admin API.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// Why a connector change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// The manifest is not valid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The component does not load (not a component, wrong world, fails at start).
    #[error(transparent)]
    Component(RuntimeError),
    /// The request itself is wrong (names disagree, parts missing...).
    #[error("{0}")]
    Request(String),
    /// No such connector.
    #[error("connector {0:?} is not loaded")]
    NotFound(String),
    /// The name belongs to a manifest in the connectors directory.
    #[error(
        "connector {name:?} is managed by the connectors directory ({path}); change or remove \
         its manifest there"
    )]
    ManagedByDirectory {
        name: String,
        /// The manifest in the connectors directory that defines it.
        path: String,
    },
    /// The name belongs to a connector uploaded through the admin API.
    #[error(
        "connector name {0:?} belongs to a connector uploaded through the admin API; DELETE it \
         first"
    )]
    ManagedByApi(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest of the connectors directory does not load (at a strict start).
    #[error("{}: {source}", path.display())]
    InFile {
        /// The manifest file.
        path: PathBuf,
        source: Box<ManageError>,
    },
}

/// What a `put` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new connector.
    Created,
    /// A new version replaced this one.
    Replaced {
        /// The version replaced.
        previous: String,
    },
    /// The same bytes and manifest were already serving; nothing changed.
    Unchanged,
}

/// The last refused change of a connector.
#[derive(Clone, Debug)]
pub struct LastError {
    /// Why the change was refused.
    pub message: String,
    pub at: DateTime<Utc>,
}

/// Everything the admin API shows about one connector.
#[derive(Clone, Debug)]
pub struct ConnectorInfo {
    pub name: String,
    /// Who manages it.
    pub source: Source,
    /// The version serving and its state; `None` when it failed to load and no version of it
    /// serves (its `last_error` says why).
    pub entry: Option<Arc<Entry>>,
    /// Counters since this process started.
    pub metrics: Arc<ConnectorMetrics>,
    /// The last refused change, if any since the version serving was loaded.
    pub last_error: Option<LastError>,
    /// Undelivered deliveries in the database.
    pub queue: QueueCounts,
}

/// Handle to the connector lifecycle (cheap to clone).
#[derive(Clone)]
pub struct Connectors {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: Runtime,
    registry: Arc<Registry>,
    store: Store,
    metrics: Arc<Metrics>,
    control: tokio::sync::Mutex<Control>,
    errors: Mutex<BTreeMap<String, LastError>>,
    /// Configured connectors that did not load (a manifest of the directory, a stored
    /// upload), by name, with where they come from. Listed as `failed` while no version of
    /// that name serves; forgotten when one loads or their manifest or upload goes.
    failed: Mutex<BTreeMap<String, Source>>,
    /// The database's gauges for `/metrics`, read at most once a second.
    gauges: gauges::GaugeReadings,
}

/// State only the lock holder touches.
#[derive(Default)]
struct Control {
    dir: Option<dir::DirState>,
    /// Uploads (name → version) that did not load here, so they are not retried in a loop.
    refused_uploads: HashMap<String, String>,
}

impl Connectors {
    /// A lifecycle over this runtime, registry and store.
    pub fn new(
        runtime: Runtime,
        registry: Arc<Registry>,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Self {
        Connectors {
            inner: Arc::new(Inner {
                runtime,
                registry,
                store,
                metrics,
                control: tokio::sync::Mutex::new(Control::default()),
                errors: Mutex::new(BTreeMap::new()),
                failed: Mutex::new(BTreeMap::new()),
                gauges: gauges::GaugeReadings::default(),
            }),
        }
    }

    /// The registry the dispatcher reads.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// The process metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Loads the uploaded connectors stored in the database, then every manifest in `dir`.
    /// A connector that does not load (bad manifest, not a component, wrong world, trap at
    /// start) is logged with its file, listed as `failed` with its `lastError`, and the others
    /// serve: one bad plug-in must not keep every other one, and the API, down across a
    /// restart. The watcher loads it once its file is fixed. With `strict`, a manifest of the
    /// directory that does not load fails the start instead, naming the file (a stored upload
    /// never does: only the running service's API could remove it). Returns how many
    /// connectors are loaded.
    pub async fn start(&self, dir: Option<&Path>, strict: bool) -> Result<usize, ManageError> {
        let disabled = self.disabled_in_store().await?;
        let mut control = self.inner.control.lock().await;
        for (name, version) in self.inner.store.upload_versions().await? {
            if let Err(e) = self
                .install_upload(&mut control, &name, !disabled.contains(&name))
                .await
            {
                tracing::error!(connector = %name, %version, error = %e, "stored connector upload does not load; the other connectors serve");
                self.record_error(&name, &e);
            }
        }
        if let Some(dir) = dir {
            let mut state = dir::DirState::new(dir.to_owned());
            for (path, fingerprint) in state.initial()? {
                if let Err(e) = self.apply_manifest(&path, &disabled).await {
                    if strict {
                        return Err(ManageError::InFile {
                            path,
                            source: Box::new(e),
                        });
                    }
                    tracing::error!(
                        manifest = %path.display(),
                        error = %e,
                        "connector does not load; the other connectors serve, and this one loads once its files are fixed"
                    );
                }
                // Failed or not, this is the version seen: the watcher acts on the next change.
                state.mark_applied(path, fingerprint);
            }
            control.dir = Some(state);
        }
        Ok(self.inner.registry.snapshot().len())
    }

    /// The configured connectors (directory manifests, stored uploads) that serve no version
    /// because they failed to load. Disabled connectors are not among them: they are loaded
    /// and held on purpose.
    pub fn failed(&self) -> Vec<String> {
        let registry = self.inner.registry.snapshot();
        self.failed_map()
            .keys()
            .filter(|name| !registry.contains_key(*name))
            .cloned()
            .collect()
    }

    /// Adds or replaces a connector uploaded through the admin API. Without `component`,
    /// the stored component is kept and only the manifest changes. The new version is
    /// validated and compiled first, then stored, then swapped in.
    pub async fn put(
        &self,
        name: &str,
        manifest_text: &str,
        component: Option<Vec<u8>>,
        audit: Option<AuditEntry>,
    ) -> Result<(PutOutcome, Arc<Entry>), ManageError> {
        let manifest = Manifest::parse_uploaded(manifest_text, &format!("manifest of {name}"))?;
        if manifest.name != name {
            return Err(ManageError::Request(format!(
                "the manifest names {:?} but the request path names {name:?}",
                manifest.name
            )));
        }
        let mut control = self.inner.control.lock().await;
        let existing = self.inner.registry.get(name);
        if let Some(e) = &existing
            && let Source::Directory(path) = &e.source
        {
            return Err(ManageError::ManagedByDirectory {
                name: name.to_owned(),
                path: path.display().to_string(),
            });
        }
        let bytes = match component {
            Some(bytes) => bytes,
            None => {
                self.inner
                    .store
                    .get_upload(name)
                    .await?
                    .ok_or_else(|| {
                        ManageError::Request(format!(
                            "no component is stored for {name:?}; send a `component` part"
                        ))
                    })?
                    .component
            }
        };
        let version = version_of(&bytes, manifest_text);
        if let Some(e) = &existing
            && e.connector.version == version
        {
            return Ok((PutOutcome::Unchanged, e.clone()));
        }
        let loaded = self.prepare(name, manifest, &bytes).await?;
        self.inner
            .store
            .put_upload(
                UploadRow {
                    name: name.to_owned(),
                    manifest: manifest_text.to_owned(),
                    component: bytes,
                    version,
                    updated_at: now_millis(),
                },
                audit,
            )
            .await?;
        control.refused_uploads.remove(name);
        self.inner.registry.set_refused(name, None);
        let enabled = match &existing {
            Some(e) => e.enabled,
            None => !self.is_disabled_in_store(name).await?,
        };
        let entry = self.swap(name, loaded, Source::Api, enabled);
        let outcome = match existing {
            Some(e) => PutOutcome::Replaced {
                previous: e.connector.version.clone(),
            },
            None => PutOutcome::Created,
        };
        Ok((outcome, entry))
    }

    /// Unloads and forgets a connector uploaded through the admin API. Its pending
    /// deliveries stay in the outbox, held, until a connector of that name returns.
    pub async fn remove(&self, name: &str, audit: Option<AuditEntry>) -> Result<(), ManageError> {
        let _control = self.inner.control.lock().await;
        match self.inner.registry.get(name) {
            Some(e) => {
                if let Source::Directory(path) = &e.source {
                    return Err(ManageError::ManagedByDirectory {
                        name: name.to_owned(),
                        path: path.display().to_string(),
                    });
                }
                self.inner.store.delete_upload(name, audit).await?;
                self.unload(name, "removed through the admin API");
                Ok(())
            }
            // Stored but refused here (e.g. it failed to load): removing it is still allowed.
            None if self.inner.store.delete_upload(name, audit).await? => {
                self.forget_failed(|n, source| n == name && *source == Source::Api);
                Ok(())
            }
            None => Err(ManageError::NotFound(name.to_owned())),
        }
    }

    /// Switches a connector on or off on every instance. While off, its events are fanned
    /// out and held as pending deliveries; switching it on delivers them.
    pub async fn set_enabled(
        &self,
        name: &str,
        enabled: bool,
        audit: Option<AuditEntry>,
    ) -> Result<Arc<Entry>, ManageError> {
        let _control = self.inner.control.lock().await;
        let entry = self
            .inner
            .registry
            .get(name)
            .ok_or_else(|| ManageError::NotFound(name.to_owned()))?;
        self.inner.store.set_enabled(name, enabled, audit).await?;
        Ok(self.apply_enabled(&entry, name, enabled))
    }

    /// Updates the enabled flag in the registry (already persisted).
    fn apply_enabled(&self, entry: &Arc<Entry>, name: &str, enabled: bool) -> Arc<Entry> {
        if entry.enabled == enabled {
            return entry.clone();
        }
        let next = Arc::new(Entry {
            enabled,
            ..Entry::clone(entry)
        });
        let published = next.clone();
        self.inner.registry.update(|set| {
            set.insert(name.to_owned(), published);
        });
        tracing::info!(connector = %name, enabled, "connector {}", if enabled { "enabled" } else { "disabled; its deliveries are held" });
        if enabled {
            // Held deliveries are due now.
            self.inner.store.committed().notify_one();
        }
        next
    }

    /// One connector as the admin API shows it (loaded, or configured and failed).
    pub async fn describe(&self, name: &str) -> Result<ConnectorInfo, ManageError> {
        let found = match self.inner.registry.get(name) {
            Some(entry) => Some((entry.source.clone(), Some(entry))),
            None => self.failed_map().get(name).map(|s| (s.clone(), None)),
        };
        let (source, entry) = found.ok_or_else(|| ManageError::NotFound(name.to_owned()))?;
        let queue = self
            .inner
            .store
            .queue_counts(Some(name))
            .await?
            .remove(name)
            .unwrap_or_default();
        Ok(self.info(name, source, entry, queue))
    }

    /// Every loaded connector and every configured one that failed to load, by name.
    pub async fn list(&self) -> Result<Vec<ConnectorInfo>, ManageError> {
        let mut queues = self.inner.store.queue_counts(None).await?;
        let registry = self.inner.registry.snapshot();
        let mut all: BTreeMap<String, (Source, Option<Arc<Entry>>)> = self
            .failed_map()
            .into_iter()
            .map(|(name, source)| (name, (source, None)))
            .collect();
        for (name, entry) in registry.iter() {
            all.insert(name.clone(), (entry.source.clone(), Some(entry.clone())));
        }
        Ok(all
            .into_iter()
            .map(|(name, (source, entry))| {
                let queue = queues.remove(&name).unwrap_or_default();
                self.info(&name, source, entry, queue)
            })
            .collect())
    }

    /// The Prometheus exposition. The queue gauges and the backlog come from a reading of
    /// the database at most a second old (see [`gauges`]) and are omitted when the database
    /// cannot answer.
    pub async fn render_metrics(&self) -> String {
        let (queues, backlog) = self.inner.gauges.read(&self.inner.store).await;
        let gauges: Vec<ConnectorGauge> = self
            .inner
            .registry
            .snapshot()
            .iter()
            .map(|(name, e)| ConnectorGauge {
                name: name.clone(),
                version: e.connector.version.clone(),
                source: e.source.label(),
                enabled: e.enabled,
                queue: queues
                    .as_ref()
                    .map(|q| q.get(name).copied().unwrap_or_default()),
            })
            .collect();
        let registry = self.inner.registry.snapshot();
        let failed: Vec<FailedGauge> = self
            .failed_map()
            .into_iter()
            .filter(|(name, _)| !registry.contains_key(name))
            .map(|(name, source)| FailedGauge {
                name,
                source: source.label(),
            })
            .collect();
        self.inner.metrics.render(&gauges, &failed, backlog)
    }

    fn info(
        &self,
        name: &str,
        source: Source,
        entry: Option<Arc<Entry>>,
        queue: QueueCounts,
    ) -> ConnectorInfo {
        let last_error = self
            .inner
            .errors
            .lock()
            .ok()
            .and_then(|e| e.get(name).cloned());
        ConnectorInfo {
            name: name.to_owned(),
            source,
            metrics: self.inner.metrics.connector(name),
            entry,
            last_error,
            queue,
        }
    }

    /// A copy of the configured connectors that failed to load (some may serve an older
    /// version meanwhile).
    fn failed_map(&self) -> BTreeMap<String, Source> {
        self.inner
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records that the configured connector `name` (from `source`) did not load. A manifest
    /// names one connector: a name it gave before is no longer configured by it.
    fn mark_failed(&self, name: &str, source: Source) {
        let mut failed = self
            .inner
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if matches!(source, Source::Directory(_)) {
            failed.retain(|n, s| n == name || *s != source);
        }
        failed.insert(name.to_owned(), source);
    }

    /// Forgets the failed connectors `drop` picks.
    fn forget_failed(&self, drop: impl Fn(&str, &Source) -> bool) {
        self.inner
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|n, s| !drop(n, s));
    }

    /// Validates, compiles (or takes from the cache) and pre-instantiates a candidate.
    async fn prepare(
        &self,
        name: &str,
        manifest: Manifest,
        bytes: &[u8],
    ) -> Result<Arc<LoadedConnector>, ManageError> {
        match self
            .inner
            .runtime
            .load_bytes(manifest, bytes.to_vec())
            .await
        {
            Ok(loaded) => {
                self.inner
                    .metrics
                    .compiled(loaded.cache == CacheOutcome::Hit);
                Ok(loaded)
            }
            Err(e) => {
                let e = ManageError::Component(e);
                self.record_error(name, &e);
                Err(e)
            }
        }
    }

    /// Publishes a prepared version: one atomic store; calls in flight keep the old one.
    fn swap(
        &self,
        name: &str,
        loaded: Arc<LoadedConnector>,
        source: Source,
        enabled: bool,
    ) -> Arc<Entry> {
        let previous = self.inner.registry.get(name);
        let entry = Arc::new(Entry {
            connector: loaded,
            source,
            enabled,
            loaded_at: Utc::now(),
        });
        let published = entry.clone();
        self.inner.registry.update(|set| {
            set.insert(name.to_owned(), published);
        });
        if let Ok(mut errors) = self.inner.errors.lock() {
            errors.remove(name);
        }
        self.forget_failed(|n, _| n == name);
        if let Some(old) = &previous
            && old.connector.version != entry.connector.version
        {
            self.inner.runtime.forget(&old.connector);
        }
        let metrics = self.inner.metrics.connector(name);
        metrics.swapped();
        tracing::info!(
            connector = %name,
            version = %entry.connector.version,
            world = %entry.connector.world,
            previous = previous.as_ref().map(|p| p.connector.version.as_str()).unwrap_or("-"),
            source = entry.source.label(),
            enabled,
            cache = ?entry.connector.cache,
            "connector version serving"
        );
        // A returning connector may have deliveries waiting.
        self.inner.store.committed().notify_one();
        entry
    }

    fn unload(&self, name: &str, why: &str) {
        if let Some(old) = self.inner.registry.get(name) {
            self.inner.runtime.forget(&old.connector);
        }
        self.inner.registry.update(|set| {
            set.remove(name);
        });
        tracing::info!(connector = %name, "connector unloaded ({why}); its pending deliveries are held");
    }

    fn record_error(&self, name: &str, e: &ManageError) {
        self.inner.metrics.connector(name).rejected();
        if let Ok(mut errors) = self.inner.errors.lock() {
            errors.insert(
                name.to_owned(),
                LastError {
                    message: e.to_string(),
                    at: Utc::now(),
                },
            );
        }
    }

    /// The names of the connectors switched off in the database (by any instance).
    async fn disabled_in_store(&self) -> Result<HashSet<String>, StoreError> {
        Ok(self
            .inner
            .store
            .disabled_connectors()
            .await?
            .into_iter()
            .collect())
    }

    async fn is_disabled_in_store(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .store
            .disabled_connectors()
            .await?
            .iter()
            .any(|n| n == name))
    }

    /// Loads the stored upload `name` (used at start and when another instance changed it).
    async fn install_upload(
        &self,
        control: &mut Control,
        name: &str,
        enabled: bool,
    ) -> Result<(), ManageError> {
        if let Some(e) = self.inner.registry.get(name)
            && let Source::Directory(path) = &e.source
        {
            return Err(ManageError::ManagedByDirectory {
                name: name.to_owned(),
                path: path.display().to_string(),
            });
        }
        let Some(row) = self.inner.store.get_upload(name).await? else {
            return Ok(());
        };
        if self
            .inner
            .registry
            .get(name)
            .is_some_and(|e| e.connector.version == row.version)
        {
            return Ok(());
        }
        if control.refused_uploads.get(name) == Some(&row.version) {
            return Ok(());
        }
        let loaded = match Manifest::parse_uploaded(&row.manifest, &format!("manifest of {name}")) {
            Ok(manifest) => self.prepare(name, manifest, &row.component).await,
            Err(e) => Err(ManageError::Manifest(e)),
        };
        match loaded {
            Ok(loaded) => {
                self.swap(name, loaded, Source::Api, enabled);
                Ok(())
            }
            Err(e) => {
                self.inner.registry.set_refused(name, Some(&row.version));
                control.refused_uploads.insert(name.to_owned(), row.version);
                if !matches!(e, ManageError::Store(_)) {
                    self.mark_failed(name, Source::Api);
                }
                Err(e)
            }
        }
    }

    /// Loads or replaces the connector of one directory manifest. A manifest that does not
    /// load is recorded as failed under its connector's name (its file's stem when the
    /// manifest itself is unreadable), unless the name belongs to another source.
    async fn apply_manifest(
        &self,
        path: &Path,
        disabled: &HashSet<String>,
    ) -> Result<PutOutcome, ManageError> {
        let (name, result) = match Manifest::load(path) {
            Ok(manifest) => {
                let name = manifest.name.clone();
                (
                    name,
                    self.apply_loaded_manifest(path, manifest, disabled).await,
                )
            }
            Err(e) => {
                let e = ManageError::Manifest(e);
                // The connector this file serves, if any, is the one whose change failed.
                let name = self
                    .inner
                    .registry
                    .snapshot()
                    .iter()
                    .find(|(_, entry)| entry.source == Source::Directory(path.to_owned()))
                    .map_or_else(|| label_of(path), |(name, _)| name.clone());
                self.record_error(&name, &e);
                (name, Err(e))
            }
        };
        if let Err(e) = &result
            && !matches!(
                e,
                ManageError::ManagedByApi(_) | ManageError::Request(_) | ManageError::Store(_)
            )
        {
            self.mark_failed(&name, Source::Directory(path.to_owned()));
        }
        result
    }

    async fn apply_loaded_manifest(
        &self,
        path: &Path,
        manifest: Manifest,
        disabled: &HashSet<String>,
    ) -> Result<PutOutcome, ManageError> {
        let name = manifest.name.clone();
        let existing = self.inner.registry.get(&name);
        match existing.as_ref().map(|e| &e.source) {
            Some(Source::Api) => return Err(ManageError::ManagedByApi(name)),
            Some(Source::Directory(other)) if other != path => {
                return Err(ManageError::Request(format!(
                    "connector name {name:?} is already used by {}",
                    other.display()
                )));
            }
            _ => {}
        }
        let bytes = tokio::fs::read(&manifest.component)
            .await
            .map_err(|source| {
                ManageError::Component(RuntimeError::Read {
                    path: manifest.component.display().to_string(),
                    source,
                })
            });
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                self.record_error(&name, &e);
                return Err(e);
            }
        };
        if let Some(e) = &existing
            && e.connector.version == version_of(&bytes, &manifest.source)
        {
            return Ok(PutOutcome::Unchanged);
        }
        let loaded = self.prepare(&name, manifest, &bytes).await?;
        // The manifest may have been renamed inside the file: its old name goes.
        let stale: Vec<String> = self
            .inner
            .registry
            .snapshot()
            .iter()
            .filter(|(n, e)| **n != name && e.source == Source::Directory(path.to_owned()))
            .map(|(n, _)| n.clone())
            .collect();
        for old in stale {
            self.unload(&old, "its manifest now names another connector");
        }
        let enabled = match &existing {
            Some(e) => e.enabled,
            None => !disabled.contains(&name),
        };
        self.swap(&name, loaded, Source::Directory(path.to_owned()), enabled);
        Ok(match existing {
            Some(e) => PutOutcome::Replaced {
                previous: e.connector.version.clone(),
            },
            None => PutOutcome::Created,
        })
    }

    /// One pass over the watched directory; returns whether files are still changing (the
    /// caller scans again after the debounce interval).
    pub async fn sync_dir(&self) -> bool {
        let mut control = self.inner.control.lock().await;
        let Some(state) = control.dir.as_mut() else {
            return false;
        };
        let (actions, unsettled) = state.scan();
        if actions.is_empty() {
            return unsettled;
        }
        let disabled = match self.disabled_in_store().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read connector states; will retry");
                state.forget_observations();
                return true;
            }
        };
        for action in actions {
            match action {
                dir::Action::Apply(path, fingerprint) => {
                    let started = Instant::now();
                    match self.apply_manifest(&path, &disabled).await {
                        Ok(PutOutcome::Unchanged) => {}
                        Ok(_) => tracing::info!(
                            manifest = %path.display(),
                            ms = started.elapsed().as_millis() as u64,
                            "connector directory change applied"
                        ),
                        Err(e) => {
                            tracing::error!(
                                manifest = %path.display(),
                                error = %e,
                                "connector change refused; the previous version (if any) keeps serving"
                            );
                        }
                    }
                    state.mark_applied(path, fingerprint);
                }
                dir::Action::Unload(path) => {
                    let gone = Source::Directory(path.clone());
                    self.forget_failed(|_, source| *source == gone);
                    let owned: Vec<String> = self
                        .inner
                        .registry
                        .snapshot()
                        .iter()
                        .filter(|(_, e)| e.source == Source::Directory(path.clone()))
                        .map(|(n, _)| n.clone())
                        .collect();
                    for name in owned {
                        self.unload(&name, "its manifest was removed");
                    }
                }
            }
        }
        unsettled
    }

    /// Brings this instance in line with the database: uploads added, replaced or removed and
    /// enabled flags changed by any instance.
    pub async fn reconcile(&self) -> Result<(), StoreError> {
        // Read under the lock: a change this instance is making commits before the lock is
        // released, so what is read here is never older than the registry.
        let mut control = self.inner.control.lock().await;
        let versions: BTreeMap<String, String> = self
            .inner
            .store
            .upload_versions()
            .await?
            .into_iter()
            .collect();
        let disabled = self.disabled_in_store().await?;
        for (name, version) in &versions {
            let current = self.inner.registry.get(name);
            if current
                .as_ref()
                .is_some_and(|e| &e.connector.version == version || e.source != Source::Api)
            {
                continue;
            }
            let enabled = current.map_or(!disabled.contains(name), |e| e.enabled);
            if let Err(e) = self.install_upload(&mut control, name, enabled).await {
                tracing::error!(connector = %name, %version, error = %e, "connector changed by another instance does not load here; the previous version (if any) keeps serving");
            }
        }
        self.forget_failed(|name, source| *source == Source::Api && !versions.contains_key(name));
        for (name, entry) in self.inner.registry.snapshot().iter() {
            if entry.source == Source::Api && !versions.contains_key(name) {
                self.unload(name, "removed on another instance");
                continue;
            }
            self.apply_enabled(entry, name, !disabled.contains(name));
        }
        Ok(())
    }
}

/// A label for a manifest whose name could not be read: its file stem.
fn label_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| PathBuf::from(path).display().to_string())
}
