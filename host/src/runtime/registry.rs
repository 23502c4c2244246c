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

    /// One connector.
    pub fn get(&self, name: &str) -> Option<Arc<Entry>> {
        self.current.load().get(name).cloned()
    }

    /// Applies `change` to a copy of the set and publishes it in one atomic store. Callers
    /// must be serialised (the connector manager holds a lock), or one change could be lost.
    pub fn update(&self, change: impl FnOnce(&mut ConnectorSet)) {
        let mut next = ConnectorSet::clone(&self.current.load());
        change(&mut next);
        self.current.store(Arc::new(next));
    }
}
