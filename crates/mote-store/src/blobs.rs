//! Content-addressed blob storage under `blobs/sha256/<hex>`.
//!
//! A blob is written to a temp file in `tmp/` (same filesystem), hashed while it is copied,
//! fsynced, made read-only and renamed into place only when its digest is known (and, when the
//! caller names one, matches). A process killed at any point leaves at most a temp file,
//! which is invisible to readers and removed by `gc`.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};

/// The blob area of a store.
#[derive(Clone, Debug)]
pub(crate) struct Blobs {
    dir: PathBuf,
    tmp: PathBuf,
}

impl Blobs {
    pub(crate) fn new(root: &Path) -> Self {
        Blobs {
            dir: root.join("blobs").join("sha256"),
            tmp: root.join("tmp"),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Where a blob lives. The digest is validated by construction, so this cannot escape.
    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Store everything `reader` yields; returns its digest and size.
    pub(crate) fn put_reader(&self, mut reader: impl Read, source: &Path) -> Result<(Digest, u64)> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".blob-")
            .suffix(".partial")
            .tempfile_in(&self.tmp)
            .at("cannot create a temp file in", &self.tmp)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).at("cannot read", source),
            };
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).at("cannot write", tmp.path())?;
            size += n as u64;
        }
        let digest = Digest::from_bytes(hasher.finalize().into());
        self.commit(tmp, &digest)?;
        Ok((digest, size))
    }

    /// Store a byte slice; returns its digest.
    pub(crate) fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        if self.verify(&digest).is_ok() {
            return Ok(digest);
        }
        let mut tmp = tempfile::Builder::new()
            .prefix(".blob-")
            .suffix(".partial")
            .tempfile_in(&self.tmp)
            .at("cannot create a temp file in", &self.tmp)?;
        tmp.write_all(bytes).at("cannot write", tmp.path())?;
        self.commit(tmp, &digest)?;
        Ok(digest)
    }

    fn commit(&self, tmp: tempfile::NamedTempFile, digest: &Digest) -> Result<()> {
        tmp.as_file().sync_all().at("cannot sync", tmp.path())?;
        set_mode(tmp.path(), 0o444)?;
        let target = self.path(digest);
        // Renaming over an existing blob is harmless (same content) and heals a damaged copy.
        tmp.persist(&target).map_err(|e| StoreError::Io {
            action: "cannot move a verified blob into",
            path: target.clone(),
            source: e.error,
        })?;
        sync_dir(&self.dir)
    }

    /// Re-hash a stored blob. `Err(None)` when it is missing, `Err(Some(actual))` on mismatch.
    pub(crate) fn verify(&self, digest: &Digest) -> std::result::Result<u64, Option<Digest>> {
        let file = File::open(self.path(digest)).map_err(|_| None)?;
        let (actual, size) = Digest::of_reader(file).map_err(|_| None)?;
        if actual == *digest {
            Ok(size)
        } else {
            Err(Some(actual))
        }
    }

    /// Read a whole blob, checking its digest.
    pub(crate) fn read_verified(
        &self,
        digest: &Digest,
    ) -> Result<std::result::Result<Vec<u8>, Option<Digest>>> {
        let path = self.path(digest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err(None)),
            Err(e) => return Err(e).at("cannot read", path),
        };
        let actual = Digest::of(&bytes);
        Ok(if actual == *digest {
            Ok(bytes)
        } else {
            Err(Some(actual))
        })
    }
}

/// Set a file's permission bits (read-only blobs, world-readable store files).
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    let perms = {
        use std::os::unix::fs::PermissionsExt;
        fs::Permissions::from_mode(mode)
    };
    #[cfg(not(unix))]
    let perms = {
        let mut p = fs::metadata(path).at("cannot stat", path)?.permissions();
        p.set_readonly(mode & 0o200 == 0);
        p
    };
    fs::set_permissions(path, perms).at("cannot set permissions of", path)
}

/// fsync a directory so that a rename inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    mote_base::fs::sync_dir(dir).at("cannot sync directory", dir)
}

/// Write a small file atomically (mote-base's writer: temp file in the same directory,
/// fsync, rename, fsync of the directory), readable by all.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    mote_base::fs::write_atomic(path, bytes, Some(0o644)).at("cannot replace", path)
}
