//! The watched connectors directory. A change is applied only once the files involved (the
//! manifest and the component it names) have stopped changing for one debounce interval (seen
//! unchanged across two scans, or last modified at least that long ago), so a file still
//! being written is not even read; a component that is still incomplete when it
//! settles fails validation and the previous version keeps serving until the write finishes.
//! File-system notifications make the reaction quick; a slow poll catches what they miss
//! (components outside the directory, file systems without notifications).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::Watcher;
use tokio::sync::{mpsc, watch};

use super::{Connectors, ManageError};
use crate::runtime::manifest::Manifest;

/// How long files must stay unchanged before a change is applied.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Rescan interval without notifications.
pub const POLL: Duration = Duration::from_secs(1);
/// Most consecutive scans while files keep changing, before waiting for the next event.
const MAX_SETTLE_SCANS: usize = 100;

/// Size and modification time of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// What a manifest and its component looked like at one scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    manifest: Option<Stamp>,
    component: Option<(PathBuf, Option<Stamp>)>,
}

impl Fingerprint {
    fn of(manifest: &Path) -> Fingerprint {
        let stamp = Stamp::of(manifest);
        let component = stamp.as_ref().and_then(|_| {
            let m = Manifest::load(manifest).ok()?;
            let c = Stamp::of(&m.component);
            Some((m.component, c))
        });
        Fingerprint {
            manifest: stamp,
            component,
        }
    }

    fn absent(&self) -> bool {
        self.manifest.is_none()
    }

    /// Whether every file was last modified at least `quiet` ago: such files are as settled as
    /// files seen unchanged across one interval, so they need not wait for another scan.
    fn quiet_for(&self, quiet: Duration) -> bool {
        let old = |s: &Option<Stamp>| {
            s.as_ref()
                .and_then(|s| s.modified)
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_some_and(|age| age >= quiet)
        };
        old(&self.manifest) && self.component.as_ref().is_none_or(|(_, c)| old(c))
    }
}

/// A change to apply.
#[derive(Debug)]
pub enum Action {
    /// Load or replace the connector of this manifest.
    Apply(PathBuf, Fingerprint),
    /// The manifest is gone: unload its connector.
    Unload(PathBuf),
}

/// What the watcher has seen and applied.
pub struct DirState {
    dir: PathBuf,
    /// The fingerprint seen at the previous scan.
    observed: BTreeMap<PathBuf, Fingerprint>,
    /// The fingerprint last acted on (successfully or not).
    applied: BTreeMap<PathBuf, Fingerprint>,
}

impl DirState {
    /// Nothing seen yet.
    pub fn new(dir: PathBuf) -> Self {
        DirState {
            dir,
            observed: BTreeMap::new(),
            applied: BTreeMap::new(),
        }
    }

    fn manifests(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        out.sort();
        Ok(out)
    }

    /// Every manifest at start, sorted by file name.
    pub fn initial(&mut self) -> Result<Vec<(PathBuf, Fingerprint)>, ManageError> {
        let manifests = self.manifests().map_err(|e| {
            ManageError::Request(format!(
                "cannot read connectors directory {}: {e}",
                self.dir.display()
            ))
        })?;
        Ok(manifests
            .into_iter()
            .map(|p| {
                let f = Fingerprint::of(&p);
                self.observed.insert(p.clone(), f.clone());
                (p, f)
            })
            .collect())
    }

    /// Records that `path` was acted on in this state.
    pub fn mark_applied(&mut self, path: PathBuf, fingerprint: Fingerprint) {
        self.applied.insert(path, fingerprint);
    }

    /// Makes the next scan treat every file as just changed (after a failure to act).
    pub fn forget_observations(&mut self) {
        self.observed.clear();
    }

    /// Compares the directory with the previous scan. Returns the settled changes and
    /// whether some files are still changing.
    pub fn scan(&mut self) -> (Vec<Action>, bool) {
        let present = match self.manifests() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read connectors directory; connectors keep serving");
                return (Vec::new(), false);
            }
        };
        let mut actions = Vec::new();
        let mut unsettled = false;
        let mut paths: Vec<PathBuf> = present;
        for p in self.observed.keys().chain(self.applied.keys()) {
            if !paths.contains(p) {
                paths.push(p.clone());
            }
        }
        for path in paths {
            let now = Fingerprint::of(&path);
            if self.observed.get(&path) != Some(&now) {
                self.observed.insert(path.clone(), now.clone());
                if now.absent() || !now.quiet_for(DEBOUNCE) {
                    unsettled = true;
                    continue;
                }
            }
            if self.applied.get(&path) == Some(&now) {
                continue;
            }
            if now.absent() {
                self.observed.remove(&path);
                if self.applied.remove(&path).is_some() {
                    actions.push(Action::Unload(path));
                }
            } else {
                actions.push(Action::Apply(path, now));
            }
        }
        (actions, unsettled)
    }
}

/// Watches `dir` until `shutdown` turns true, applying settled changes.
pub fn spawn_watcher(
    connectors: Connectors,
    dir: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                // A full channel already holds a wake-up; nothing is lost.
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no file-system notifications; polling the connectors directory every second");
                None
            }
        };
        tracing::info!(dir = %dir.display(), "watching the connectors directory");
        loop {
            tokio::select! {
                _ = rx.recv() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.changed() => return,
            }
            for _ in 0..MAX_SETTLE_SCANS {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                if !connectors.sync_dir().await {
                    break;
                }
                if *shutdown.borrow() {
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn changes_apply_only_after_they_settle_and_removals_unload() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = DirState::new(dir.path().to_owned());
        assert!(state.initial().unwrap().is_empty());
        let wasm = dir.path().join("c.wasm");
        write(&wasm, "partial");
        let manifest = dir.path().join("c.toml");
        write(&manifest, "name = \"c\"\ncomponent = \"c.wasm\"\n");
        // First sight: still settling.
        let (actions, unsettled) = state.scan();
        assert!(actions.is_empty() && unsettled);
        // The component grows: still settling.
        write(&wasm, "partial, now longer");
        let (actions, unsettled) = state.scan();
        assert!(actions.is_empty() && unsettled);
        // Unchanged for one interval: applied once.
        let (actions, unsettled) = state.scan();
        assert!(!unsettled);
        let [Action::Apply(p, f)] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(p, &manifest);
        state.mark_applied(p.clone(), f.clone());
        assert!(state.scan().0.is_empty());
        // Removal settles too, then unloads.
        std::fs::remove_file(&manifest).unwrap();
        let (actions, unsettled) = state.scan();
        assert!(actions.is_empty() && unsettled);
        let (actions, _) = state.scan();
        assert!(matches!(actions.as_slice(), [Action::Unload(p)] if p == &manifest));
        assert!(state.scan().0.is_empty());
    }

    #[test]
    fn files_unchanged_for_the_debounce_interval_apply_at_first_sight() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = DirState::new(dir.path().to_owned());
        write(&dir.path().join("c.wasm"), "bytes");
        let manifest = dir.path().join("c.toml");
        write(&manifest, "name = \"c\"\ncomponent = \"c.wasm\"\n");
        std::thread::sleep(DEBOUNCE + Duration::from_millis(20));
        let (actions, unsettled) = state.scan();
        assert!(!unsettled);
        assert!(matches!(actions.as_slice(), [Action::Apply(p, _)] if p == &manifest));
    }

    #[test]
    fn files_that_are_not_manifests_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = DirState::new(dir.path().to_owned());
        write(&dir.path().join("notes.txt"), "x");
        write(&dir.path().join("c.toml.example"), "x");
        state.scan();
        assert!(state.scan().0.is_empty());
    }
}
