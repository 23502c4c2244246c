//! Compiled components cached on disk by content hash, so a restart (or a re-upload of the
//! same bytes) does not recompile. The key also covers the engine's compatibility hash, so a
//! new Wasmtime or different settings never load a stale artefact.
//!
//! A cached artefact is native code that is run as is, so the cache trusts nothing it did not
//! write itself: the directory must belong to this user and be writable by nobody else (else
//! the cache is off); files are created with `O_EXCL` under unpredictable names and renamed
//! into place (never written through a planted symlink), opened without following symlinks,
//! and each carries an HMAC-SHA256, under a secret key kept in the directory, of its entry
//! name (content hash and engine) and its bytes, checked before the bytes are deserialised.

use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// First bytes of every entry (format version 1: magic, MAC, artefact).
const MAGIC: &[u8; 8] = b"LSCWASM1";
/// Length of the HMAC-SHA256 tag after the magic.
const TAG_LEN: usize = 32;
/// The MAC key's file in the cache directory.
const KEY_FILE: &str = "cache.key";
/// Larger entries are not read (a compiled connector is a few MiB to tens of MiB).
const MAX_ENTRY_BYTES: u64 = 1 << 30;

/// Where compiled artefacts live.
#[derive(Clone, Debug)]
pub struct CompileCache {
    store: Option<Dir>,
}

/// A usable cache directory and its MAC key.
#[derive(Clone)]
struct Dir {
    path: PathBuf,
    key: [u8; 32],
}

impl std::fmt::Debug for Dir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Dir").field("path", &self.path).finish()
    }
}

/// Whether a load compiled or reused an artefact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Deserialised from the cache.
    Hit,
    /// Compiled (and stored, when a cache directory is set).
    Miss,
}

impl CompileCache {
    /// A cache in `dir` (created, mode 0700, if missing), or none. A directory that another
    /// user owns or may write to is not used: the cache is then off, with a warning.
    pub fn new(dir: Option<PathBuf>) -> std::io::Result<Self> {
        let Some(path) = dir else {
            return Ok(CompileCache { store: None });
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&path)?;
        if let Err(why) = private_dir(&path) {
            tracing::warn!(
                dir = %path.display(),
                "compile cache off: {why}; connectors are compiled at every load"
            );
            return Ok(CompileCache { store: None });
        }
        let key = load_or_create_key(&path)?;
        Ok(CompileCache {
            store: Some(Dir { path, key }),
        })
    }

    fn entry_name(engine: &Engine, digest: &str) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        format!("{digest}-{:016x}.cwasm", h.finish())
    }

    /// Compiles `bytes` or loads their compiled form. CPU-heavy: call from `spawn_blocking`.
    pub fn load(
        &self,
        engine: &Engine,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let digest = hex::encode(Sha256::digest(bytes));
        let name = Self::entry_name(engine, &digest);
        if let Some(dir) = &self.store {
            let path = dir.path.join(&name);
            match dir.read_verified(&path, &name) {
                Ok(Some(artefact)) => {
                    // SAFETY: the bytes carry a valid MAC under this cache's secret key over
                    // this entry's name (content hash and engine) and the bytes, so they are
                    // what `Engine::precompile_component` produced for this exact content
                    // and engine configuration when this cache stored them.
                    #[allow(unsafe_code)]
                    match unsafe { Component::deserialize(engine, &artefact) } {
                        Ok(component) => return Ok((component, CacheOutcome::Hit)),
                        Err(e) => discard(&path, &e),
                    }
                }
                Ok(None) => {}
                Err(e) => discard(&path, &e),
            }
        }
        let compiled = engine.precompile_component(bytes)?;
        if let Some(dir) = &self.store
            && let Err(e) = dir.store(&name, &compiled)
        {
            tracing::warn!(dir = %dir.path.display(), error = %e, "cannot store compiled component");
        }
        // SAFETY: `compiled` was produced by `precompile_component` on this engine just now.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, &compiled)? };
        Ok((component, CacheOutcome::Miss))
    }
}

fn discard(path: &Path, why: &dyn std::fmt::Display) {
    tracing::warn!(path = %path.display(), error = %why, "discarding unusable compile-cache entry");
    let _ = std::fs::remove_file(path);
}

/// Why a cache entry is not used.
#[derive(Debug, thiserror::Error)]
enum EntryError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a regular file of at most {MAX_ENTRY_BYTES} bytes")]
    NotAFile,
    #[error("integrity check failed (not written by this cache, or altered)")]
    BadMac,
}

impl Dir {
    /// The MAC of entry `name`, before its bytes. (HMAC takes keys of any length, so this
    /// does not fail; the error is only mapped, not expected.)
    fn mac(&self, name: &str) -> std::io::Result<Hmac<Sha256>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key)
            .map_err(|e| std::io::Error::other(format!("compile-cache key: {e}")))?;
        mac.update(name.as_bytes());
        mac.update(&[0]);
        Ok(mac)
    }

    /// The artefact of entry `name`, if present and its MAC checks out.
    fn read_verified(&self, path: &Path, name: &str) -> Result<Option<Vec<u8>>, EntryError> {
        let mut file = match open_no_follow(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let meta = file.metadata()?;
        if !meta.is_file() || meta.len() > MAX_ENTRY_BYTES {
            return Err(EntryError::NotAFile);
        }
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.read_to_end(&mut bytes)?;
        let header = MAGIC.len() + TAG_LEN;
        if bytes.len() < header || &bytes[..MAGIC.len()] != MAGIC {
            return Err(EntryError::BadMac);
        }
        let mut mac = self.mac(name)?;
        mac.update(&bytes[header..]);
        mac.verify_slice(&bytes[MAGIC.len()..header])
            .map_err(|_| EntryError::BadMac)?;
        bytes.drain(..header);
        Ok(Some(bytes))
    }

    /// Writes entry `name`: a new file under an unpredictable name, created with `O_EXCL`
    /// (which never follows a symlink), renamed over the entry (which replaces whatever is
    /// there, a symlink included, rather than writing through it).
    fn store(&self, name: &str, artefact: &[u8]) -> std::io::Result<()> {
        let mut mac = self.mac(name)?;
        mac.update(artefact);
        let tag = mac.finalize().into_bytes();
        let tmp = self
            .path
            .join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let written = create_private(&tmp).and_then(|mut f| {
            f.write_all(MAGIC)?;
            f.write_all(&tag)?;
            f.write_all(artefact)?;
            f.sync_all()
        });
        let renamed = written.and_then(|()| std::fs::rename(&tmp, self.path.join(name)));
        if renamed.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        renamed
    }
}

/// Opens an existing file for reading, refusing a symlink as its last component (Linux).
fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    options.open(path)
}

/// Creates a new file only this user can read (`O_EXCL`: fails if anything is there).
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Succeeds when `dir` is a directory of this user that no one else may write to.
fn private_dir(dir: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a directory (a symlink is not accepted)".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "writable by group or others (mode {:o}); chmod go-w it",
                meta.mode() & 0o777
            ));
        }
        #[cfg(target_os = "linux")]
        {
            let me = rustix::process::geteuid().as_raw();
            if meta.uid() != me {
                return Err(format!(
                    "owned by uid {}, not by this user ({me})",
                    meta.uid()
                ));
            }
        }
    }
    Ok(())
}

/// The directory's MAC key, created on first use. Several processes may share a directory
/// (tests, restarts overlapping): a key is written whole under a temporary name and linked
/// into place, which fails if another process linked its key first; that one is then used.
fn load_or_create_key(dir: &Path) -> std::io::Result<[u8; 32]> {
    let path = dir.join(KEY_FILE);
    if let Some(key) = read_key(&path)? {
        return Ok(key);
    }
    let key: [u8; 32] = rand::random();
    let tmp = dir.join(format!(".{KEY_FILE}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let linked = create_private(&tmp)
        .and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::hard_link(&tmp, &path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key(&path)?
            .ok_or_else(|| std::io::Error::other(format!("{} is not a key", path.display()))),
        Err(e) => Err(e),
    }
}

fn read_key(path: &Path) -> std::io::Result<Option<[u8; 32]>> {
    let mut file = match open_no_follow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut key = [0u8; 32];
    let mut rest = Vec::new();
    file.read_exact(&mut key)?;
    file.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        return Err(std::io::Error::other(format!(
            "{} is not a 32-byte key",
            path.display()
        )));
    }
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component() -> Vec<u8> {
        wat::parse_str("(component (core module (func (export \"f\"))))").unwrap()
    }

    fn entry(dir: &Path) -> PathBuf {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .unwrap()
    }

    #[test]
    fn an_altered_entry_is_never_loaded_and_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(Some(dir.path().join("cache"))).unwrap();
        let engine = Engine::default();
        let bytes = component();
        assert_eq!(cache.load(&engine, &bytes).unwrap().1, CacheOutcome::Miss);
        assert_eq!(cache.load(&engine, &bytes).unwrap().1, CacheOutcome::Hit);

        // One byte of native code changed, as someone with a write to the file could do.
        let path = entry(&dir.path().join("cache"));
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0x01;
        std::fs::write(&path, &data).unwrap();
        assert_eq!(cache.load(&engine, &bytes).unwrap().1, CacheOutcome::Miss);
        assert_eq!(cache.load(&engine, &bytes).unwrap().1, CacheOutcome::Hit);

        // An artefact this engine compiled, but not through this cache (no MAC), is refused.
        let foreign = engine.precompile_component(&bytes).unwrap();
        std::fs::write(&path, foreign).unwrap();
        assert_eq!(cache.load(&engine, &bytes).unwrap().1, CacheOutcome::Miss);

        // Another cache directory has its own key: copying an entry over does not load it.
        let other = CompileCache::new(Some(dir.path().join("other"))).unwrap();
        let copied = dir.path().join("other").join(path.file_name().unwrap());
        std::fs::copy(&path, &copied).unwrap();
        assert_eq!(other.load(&engine, &bytes).unwrap().1, CacheOutcome::Miss);
    }

    #[cfg(unix)]
    #[test]
    fn files_are_private_and_symlinks_are_replaced_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let cache = CompileCache::new(Some(root.clone())).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join(KEY_FILE)), 0o600);
        let engine = Engine::default();
        let bytes = component();
        cache.load(&engine, &bytes).unwrap();
        let path = entry(&root);
        assert_eq!(mode(&path), 0o600);

        // A symlink planted where the entry goes is neither read nor written through.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert_eq!(cache.load(&engine, &bytes).unwrap().1, CacheOutcome::Miss);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
        assert_eq!(names.len(), 2, "the key and one entry: {names:?}");
    }

    #[cfg(unix)]
    #[test]
    fn a_directory_others_may_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let cache = CompileCache::new(Some(shared.clone())).unwrap();
        let engine = Engine::default();
        let bytes = component();
        cache.load(&engine, &bytes).unwrap();
        assert_eq!(cache.load(&engine, &bytes).unwrap().1, CacheOutcome::Miss);
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
    }
}
