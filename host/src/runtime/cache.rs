//! Compiled components cached on disk by content hash, so a restart (or a re-upload of the
//! same bytes) does not recompile. The key also covers the engine's compatibility hash, so a
//! new Wasmtime or different settings never load a stale artefact.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Where compiled artefacts live.
#[derive(Clone, Debug)]
pub struct CompileCache {
    dir: Option<PathBuf>,
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
    /// A cache in `dir` (created if missing), or none.
    pub fn new(dir: Option<PathBuf>) -> std::io::Result<Self> {
        if let Some(d) = &dir {
            std::fs::create_dir_all(d)?;
        }
        Ok(CompileCache { dir })
    }

    fn path(&self, engine: &Engine, digest: &str) -> Option<PathBuf> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_key = h.finish();
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{digest}-{engine_key:016x}.cwasm")))
    }

    /// Compiles `bytes` or loads their compiled form. CPU-heavy: call from `spawn_blocking`.
    pub fn load(
        &self,
        engine: &Engine,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let digest = hex::encode(Sha256::digest(bytes));
        let path = self.path(engine, &digest);
        if let Some(path) = &path
            && path.exists()
        {
            // SAFETY: the file lives in our private cache directory, was written by
            // `Engine::precompile_component` below for this exact content hash and engine
            // configuration (both in its name), and is never taken from user input.
            #[allow(unsafe_code)]
            match unsafe { Component::deserialize_file(engine, path) } {
                Ok(component) => return Ok((component, CacheOutcome::Hit)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "discarding unusable compile-cache entry");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let compiled = engine.precompile_component(bytes)?;
        if let Some(path) = &path {
            // Write then rename, so a crash never leaves a half-written artefact behind.
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            match std::fs::write(&tmp, &compiled).and_then(|()| std::fs::rename(&tmp, path)) {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot store compiled component");
                    let _ = std::fs::remove_file(&tmp);
                }
            }
        }
        // SAFETY: `compiled` was produced by `precompile_component` on this engine just now.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, &compiled)? };
        Ok((component, CacheOutcome::Miss))
    }
}
