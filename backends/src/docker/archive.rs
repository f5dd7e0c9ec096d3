//! Reads an image archive as `docker save` streams it, in either format, without holding it
//! in memory: every regular file goes through the blob store's hashing writer, small metadata
//! files (`manifest.json`, `index.json`, ...) are kept, symlinks are recorded. Which file is
//! what is decided afterwards from the metadata, because both Docker and Podman write
//! `manifest.json` after the layers.

use std::collections::HashMap;
use std::io::Read;

use ferry_core::{BlobStore, Digest, Error, Result};

use super::pins::{Pin, Pins};

/// Metadata files kept in memory instead of stored as blobs.
const METADATA: [&str; 4] = ["manifest.json", "index.json", "oci-layout", "repositories"];
/// Bound on a metadata file's size.
const METADATA_LIMIT: u64 = 16 * 1024 * 1024;

/// What an archive held: stored files by path, metadata, symlinks.
pub struct Archive {
    /// Path in the archive → digest and size of the stored content.
    pub files: HashMap<String, (Digest, u64)>,
    pub metadata: HashMap<String, Vec<u8>>,
    /// Symlink path → target path, resolved against the link's directory.
    pub links: HashMap<String, String>,
    /// A pin on every blob this read stored, taken before the blob was put in place, so no
    /// eviction or other export's clean-up removes it before the export is recorded.
    pub pins: HashMap<Digest, Pin>,
    pinning: Pins,
}

impl Archive {
    /// An empty archive whose blobs will be pinned in `pins`.
    pub fn new(pins: &Pins) -> Self {
        Archive {
            files: HashMap::new(),
            metadata: HashMap::new(),
            links: HashMap::new(),
            pins: HashMap::new(),
            pinning: pins.clone(),
        }
    }

    /// Pins a blob this export stores (once per digest); call before it is put in place.
    pub fn pin(&mut self, digest: &Digest) {
        if !self.pins.contains_key(digest) {
            let pin = self.pinning.pin(digest);
            self.pins.insert(digest.clone(), pin);
        }
    }

    /// The stored file at `path`, following symlinks.
    pub fn file(&self, path: &str) -> Option<&(Digest, u64)> {
        let mut p = normalize(path);
        for _ in 0..16 {
            if let Some(f) = self.files.get(&p) {
                return Some(f);
            }
            p = self.links.get(&p)?.clone();
        }
        None
    }
}

/// Reads a tar stream (blocking; run it on a blocking thread) into the store and `archive`.
/// On an error, `archive.pins` still names what was stored, for the caller to discard.
pub fn read(reader: impl Read, store: &BlobStore, archive: &mut Archive) -> Result<()> {
    let mut persisting = Persisting::default();
    let result = read_entries(reader, store, archive, &mut persisting);
    // Every blob is durable (or the read failed) before the archive is interpreted.
    let persisted = persisting.join_all();
    result.and(persisted)
}

fn bad(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("engine export is not a readable tar archive: {e}"))
}

/// A failed copy of an entry: the disk filling up is said as such, not blamed on the archive.
fn disk_or_bad(e: std::io::Error, path: &str) -> Error {
    if e.kind() == std::io::ErrorKind::StorageFull {
        Error::io(
            format!("writing {path} of the export to the cache: disk full (ENOSPC)"),
            e,
        )
    } else {
        bad(e)
    }
}

/// Blobs being made durable on other threads while the archive is read on: an fsync of one
/// layer then overlaps the engine streaming the next.
#[derive(Default)]
struct Persisting {
    pending: std::collections::VecDeque<std::thread::JoinHandle<Result<()>>>,
}

impl Persisting {
    const MAX_PENDING: usize = 4;

    fn push(&mut self, blob: ferry_core::blobstore::SealedBlob) -> Result<()> {
        if self.pending.len() >= Self::MAX_PENDING {
            self.join_one()?;
        }
        self.pending.push_back(std::thread::spawn(move || blob.persist()));
        Ok(())
    }

    fn join_one(&mut self) -> Result<()> {
        match self.pending.pop_front() {
            Some(h) => h
                .join()
                .map_err(|_| Error::Internal("blob persist thread panicked".into()))?,
            None => Ok(()),
        }
    }

    fn join_all(&mut self) -> Result<()> {
        let mut first_error = None;
        while !self.pending.is_empty() {
            if let Err(e) = self.join_one() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn read_entries(
    reader: impl Read,
    store: &BlobStore,
    archive: &mut Archive,
    persisting: &mut Persisting,
) -> Result<()> {
    let mut tar = tar::Archive::new(reader);
    let mut entries = 0usize;
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        entries += 1;
        let path = normalize(&entry.path().map_err(bad)?.to_string_lossy());
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if is_legacy_v1_metadata(&path) {
                    // `<layer>/json` and `<layer>/VERSION` of the legacy format: nothing
                    // ferry serves; skipped rather than stored and removed again.
                    continue;
                }
                if METADATA.contains(&path.as_str()) {
                    if entry.size() > METADATA_LIMIT {
                        return Err(bad(format!("{path} is {} bytes", entry.size())));
                    }
                    let mut buf = Vec::with_capacity(entry.size() as usize);
                    entry.read_to_end(&mut buf).map_err(bad)?;
                    archive.metadata.insert(path, buf);
                } else {
                    let mut w = store.writer(None)?;
                    copy_large(&mut entry, &mut w).map_err(|e| disk_or_bad(e, &path))?;
                    let (size_written, expected) = (w.size(), entry.size());
                    if size_written != expected {
                        return Err(bad(format!("{path}: {size_written} of {expected} bytes")));
                    }
                    let sealed = w.seal()?;
                    let (digest, size) = (sealed.digest.clone(), sealed.size);
                    archive.pin(&digest);
                    persisting.push(sealed)?;
                    archive.files.insert(path, (digest, size));
                }
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| bad(format!("{path}: link without target")))?
                    .to_string_lossy()
                    .into_owned();
                let resolved = if entry.header().entry_type() == tar::EntryType::Link {
                    normalize(&target)
                } else {
                    let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    normalize(&format!("{dir}/{target}"))
                };
                archive.links.insert(path, resolved);
            }
            _ => {}
        }
    }
    if entries == 0 {
        return Err(bad("no entries"));
    }
    Ok(())
}

/// The per-layer v1 metadata files of a legacy docker-archive (`<dir>/json`, `<dir>/VERSION`).
fn is_legacy_v1_metadata(path: &str) -> bool {
    matches!(path.split_once('/'), Some((dir, name)) if dir != "blobs" && !name.contains('/') && (name == "json" || name == "VERSION"))
}

/// Copies with a large buffer: `io::copy`'s 8 KiB would mean one trip through the async
/// bridge per 8 KiB of a layer.
fn copy_large(from: &mut impl Read, to: &mut impl std::io::Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Resolves `.` and `..` and strips leading `./` and `/`.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_v1_metadata() {
        assert!(is_legacy_v1_metadata("abc/json"));
        assert!(is_legacy_v1_metadata("abc/VERSION"));
        assert!(!is_legacy_v1_metadata("abc/layer.tar"));
        assert!(!is_legacy_v1_metadata("abc.json"));
        assert!(!is_legacy_v1_metadata("blobs/json"));
    }

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize("./a/b/../c"), "a/c");
        assert_eq!(normalize("abc/../def.tar"), "def.tar");
        assert_eq!(normalize("/x"), "x");
    }

    #[tokio::test]
    async fn garbage_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let junk = vec![0x42u8; 5000];
        let pins = Pins::default();
        assert!(read(&junk[..], &store, &mut Archive::new(&pins)).is_err());
        assert!(read(&b""[..], &store, &mut Archive::new(&pins)).is_err());
        assert!(store.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn reads_files_links_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_cksum();
        b.append_data(&mut h, "abc.tar", &b"layer"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "id/layer.tar", "../abc.tar").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_cksum();
        b.append_data(&mut h, "manifest.json", &b"[]"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let mut a = Archive::new(&Pins::default());
        read(&data[..], &store, &mut a).unwrap();
        assert_eq!(a.file("id/layer.tar").unwrap().0, Digest::of(b"layer"));
        assert_eq!(a.metadata["manifest.json"], b"[]");
        assert_eq!(a.pins.keys().collect::<Vec<_>>(), vec![&Digest::of(b"layer")]);
    }
}
