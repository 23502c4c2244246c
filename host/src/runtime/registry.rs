//! The set of loaded connectors, swapped atomically as a whole (`ArcSwap`), so readers never
//! lock and a replacement never disturbs a call in flight (it keeps its `Arc`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::manifest::Manifest;
use super::{LoadedConnector, Runtime, RuntimeError};

/// An immutable snapshot of the loaded connectors, by name.
pub type ConnectorSet = BTreeMap<String, Arc<LoadedConnector>>;

/// Failures loading a connector directory.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The directory could not be listed.
    #[error("cannot read connectors directory {path}: {source}")]
    Dir {
        /// Directory.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] super::manifest::ManifestError),
    /// A component is invalid.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Two manifests claim one name.
    #[error("connector name {0:?} is used by more than one manifest")]
    Duplicate(String),
}

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

    /// Replaces the whole set at once.
    pub fn replace(&self, set: ConnectorSet) {
        self.current.store(Arc::new(set));
    }

    /// One connector.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedConnector>> {
        self.current.load().get(name).cloned()
    }

    /// Loads every `*.toml` manifest in `dir` (sorted by file name); any invalid manifest or
    /// component fails the whole load with a message naming it.
    pub async fn load_dir(&self, runtime: &Runtime, dir: &Path) -> Result<usize, LoadError> {
        let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let mut manifests: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        manifests.sort();
        let mut set = ConnectorSet::new();
        for path in manifests {
            let manifest = Manifest::load(&path)?;
            let name = manifest.name.clone();
            if set.contains_key(&name) {
                return Err(LoadError::Duplicate(name));
            }
            let loaded = runtime.load(manifest).await?;
            set.insert(name, loaded);
        }
        let n = set.len();
        self.replace(set);
        Ok(n)
    }
}
