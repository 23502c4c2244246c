//! The set of loaded connectors, swapped atomically as a whole (`ArcSwap`), so readers never
//! lock and a replacement never disturbs a call in flight (it keeps its `Arc`). Writers are
//! serialised by the connector manager (`lifecycle`); this type only holds the current set.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};

use super::LoadedConnector;

/// Where a connector came from; the source owns the name until the connector is removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A manifest in the watched connectors directory.
    Directory(PathBuf),
    /// Uploaded through the admin API (stored in the database).
    Api,
}

impl Source {
    /// `directory` or `api`.
    pub fn label(&self) -> &'static str {
        match self {
            Source::Directory(_) => "directory",
            Source::Api => "api",
        }
    }
}

/// One loaded connector and its operator state.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The version serving.
    pub connector: Arc<LoadedConnector>,
    /// Who manages it.
    pub source: Source,
    /// Disabled connectors keep receiving (held) deliveries but are never called.
    pub enabled: bool,
    /// When this version was swapped in.
    pub loaded_at: DateTime<Utc>,
}

/// An immutable snapshot of the loaded connectors, by name.
pub type ConnectorSet = BTreeMap<String, Arc<Entry>>;

/// The loaded connectors.
#[derive(Default)]
pub struct Registry {
    current: ArcSwap<ConnectorSet>,
    /// Stored uploads (name → version) this instance tried and could not load: they are
    /// accounted for (see [`Registry::covers`]) although they serve nothing here.
    refused: std::sync::Mutex<BTreeMap<String, String>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current set (cheap; hold it for the duration of one decision).
    pub fn snapshot(&self) -> Arc<ConnectorSet> {
        self.current.load_full()
    }

    /// The connector loaded as `name` (in the current set), if any.
    pub fn get(&self, name: &str) -> Option<Arc<Entry>> {
        self.current.load().get(name).cloned()
    }

    /// Records that the stored upload `name` at `version` does not load on this instance
    /// (`None`: forget it, say once a version loads or the upload is removed).
    pub fn set_refused(&self, name: &str, version: Option<&str>) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match version {
            Some(v) => refused.insert(name.to_owned(), v.to_owned()),
            None => refused.remove(name),
        };
    }

    /// Whether this instance has caught up with the stored uploads (name, version): each is
    /// loaded at that version, refused at that version, or shadowed by a directory connector
    /// of the same name; and no uploaded connector is loaded that is no longer stored. The
    /// dispatcher routes a batch only when this holds, so a connector uploaded on another
    /// instance is never left out of the events committed after its upload.
    pub fn covers(&self, uploads: &[(String, String)]) -> bool {
        let current = self.current.load();
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let stored_here = uploads
            .iter()
            .all(|(name, version)| match current.get(name) {
                Some(e) if e.source != Source::Api => true,
                Some(e) if &e.connector.version == version => true,
                _ => refused.get(name) == Some(version),
            });
        stored_here
            && current
                .iter()
                .filter(|(_, e)| e.source == Source::Api)
                .all(|(name, _)| uploads.iter().any(|(n, _)| n == name))
    }

    /// Applies `change` to a copy of the set and publishes it in one atomic store. Callers
    /// must be serialised (the connector manager holds a lock), or one change could be lost.
    pub fn update(&self, change: impl FnOnce(&mut ConnectorSet)) {
        let mut next = ConnectorSet::clone(&self.current.load());
        change(&mut next);
        self.current.store(Arc::new(next));
    }
}
