//! Atomic output directories: everything is written under a hidden
//! temporary sibling of the destination and renamed into place only when
//! complete, so an interrupted run never leaves a half model that looks whole.
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// A directory being written. Dropped without `commit`, it is removed.
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Starts writing `dest`. Fails if `dest` exists, unless `force`, in
    /// which case the old directory is replaced only at `commit`.
    pub fn create(dest: &Path, force: bool) -> Result<Self> {
        if dest.exists() && !force {
            return Err(Error::Invalid(format!(
                "output {} already exists (pass --force to replace it)",
                dest.display()
            )));
        }
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = dest
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("bad output path {}", dest.display())))?
            .to_string_lossy()
            .into_owned();
        let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// The temporary directory to write files into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished directory into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.dest.exists() {
            std::fs::remove_dir_all(&self.dest).map_err(|e| Error::io(&self.dest, e))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes a file atomically: to `path.tmp`, then renamed.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes a JSON value, pretty-printed, atomically.
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
    write_file(path, text.as_bytes())
}
