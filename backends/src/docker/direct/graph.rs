//! Docker's graph-driver storage, read directly: an image's config from
//! `image/<driver>/imagedb/content/sha256/<id>`, each layer's tar recipe from
//! `image/<driver>/layerdb/sha256/<chain id>/tar-split.json.gz` and its files from the
//! driver's directory for the layer's `cache-id` (`overlay2/<cache-id>/diff`,
//! `vfs/dir/<cache-id>`). Nothing here writes.

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use ferry_core::{ByteStream, Digest, Error, Result};

use super::tarsplit::{self, Piece};

/// Bytes read from a layer file at a time, and sent on as one chunk.
const CHUNK: usize = 256 * 1024;

/// A Docker data root whose graph driver ferry can read.
#[derive(Clone, Debug)]
pub struct GraphRoot {
    root: PathBuf,
    driver: String,
}

/// Where one layer's tar comes from.
#[derive(Clone, Debug)]
pub struct LayerFiles {
    /// The layer's tar-split.
    pub tar_split: PathBuf,
    /// The layer's own files (its diff).
    pub dir: PathBuf,
}

impl GraphRoot {
    /// The data root `root` (`docker info`'s DockerRootDir) with graph driver `driver`, when
    /// ferry can serve from it; otherwise why not (said once in the log; exports serve).
    pub fn probe(root: &Path, driver: &str) -> std::result::Result<Self, String> {
        if !matches!(driver, "overlay2" | "vfs") {
            return Err(format!(
                "storage driver {driver} is not one ferry reads (overlay2, vfs)"
            ));
        }
        let g = GraphRoot {
            root: root.to_path_buf(),
            driver: driver.to_string(),
        };
        let layerdb = g.image_dir().join("layerdb/sha256");
        std::fs::read_dir(&layerdb).map_err(|e| {
            format!(
                "cannot read {} ({e}): mount the data root read-only into ferry's container, or run ferry as root",
                layerdb.display()
            )
        })?;
        Ok(g)
    }

    fn image_dir(&self) -> PathBuf {
        self.root.join("image").join(&self.driver)
    }

    /// The image's config as the engine stores it (its digest is the image id), or `None`.
    pub fn config(&self, image_id: &Digest) -> Result<Option<Vec<u8>>> {
        let path = self.image_dir().join("imagedb/content/sha256").join(image_id.hex());
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// The files of the layer with chain id `chain`, or `None` when the engine has no such
    /// layer (any more).
    pub fn layer(&self, chain: &Digest) -> Result<Option<LayerFiles>> {
        let dir = self.image_dir().join("layerdb/sha256").join(chain.hex());
        let cache_id = match std::fs::read_to_string(dir.join("cache-id")) {
            Ok(id) => id.trim().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
        };
        if cache_id.is_empty() || cache_id.contains(['/', '.']) {
            return Err(Error::Internal(format!(
                "layer {chain}: unusable cache-id {cache_id:?}"
            )));
        }
        let files = match self.driver.as_str() {
            "overlay2" => self.root.join("overlay2").join(&cache_id).join("diff"),
            _ => self.root.join("vfs/dir").join(&cache_id),
        };
        Ok(Some(LayerFiles {
            tar_split: dir.join("tar-split.json.gz"),
            dir: files,
        }))
    }
}

/// The chain ids of a config's diff ids: the first is the first diff id, each next one
/// `sha256("<chain id> <diff id>")` — how Docker's layer store names layers.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => Digest::of(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// A layer file's path inside the layer's directory; `None` for a name that would leave it.
fn inside(dir: &Path, name: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let rel = Path::new(std::ffi::OsStr::from_bytes(name));
    rel.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| dir.join(rel))
}

/// The tar's bytes `[offset, offset + len)`, assembled from the tar-split and the layer's
/// files on a blocking thread. When the whole tar is read (`verify`), every byte is hashed
/// and the last chunk is held back until the hash is `diff_id`: a layer that changed under
/// the engine (removed, rebuilt) ends in an error instead of its last byte, so no client
/// takes a corrupt blob whole. `verified` is told whether the hash matched.
pub fn stream(
    layer: LayerFiles,
    diff_id: Digest,
    offset: u64,
    len: u64,
    verify: bool,
    verified: impl FnOnce(bool) + Send + 'static,
) -> ByteStream {
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(2);
    tokio::task::spawn_blocking(move || {
        let mut out = Assembler {
            tx,
            skip: offset,
            left: len,
            hasher: verify.then(Sha256::new),
            held: None,
        };
        match out.run(&layer) {
            Ok(true) => match out.hasher.take() {
                Some(h) => {
                    let actual = Digest::from_hasher(h);
                    let ok = actual == diff_id;
                    verified(ok);
                    if ok {
                        out.release();
                    } else {
                        tracing::warn!(layer = %diff_id, %actual, dir = %layer.dir.display(),
                            "layer files no longer hash to the diff id (the image changed under the engine): response cut short");
                        out.fail(io::Error::other(format!("layer {diff_id} changed on disk")));
                    }
                }
                None => out.release(),
            },
            Ok(false) => {} // the client went away
            Err(e) => {
                // Files gone or shorter: the image changed under the engine.
                verified(false);
                out.fail(e)
            }
        }
    });
    let mut rx = rx;
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

struct Assembler {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    skip: u64,
    left: u64,
    hasher: Option<Sha256>,
    /// The last chunk, sent only once the whole tar has hashed right.
    held: Option<Bytes>,
}

impl Assembler {
    /// Feeds every piece through; `false` when the receiver went away.
    fn run(&mut self, layer: &LayerFiles) -> io::Result<bool> {
        let pieces = tarsplit::open(&layer.tar_split).map_err(io::Error::other)?;
        for piece in pieces {
            if self.left == 0 && self.hasher.is_none() {
                break;
            }
            match piece.map_err(io::Error::other)? {
                Piece::Raw(bytes) => {
                    if !self.feed(Bytes::from(bytes)) {
                        return Ok(false);
                    }
                }
                Piece::File { path, size } => {
                    if size == 0 {
                        continue;
                    }
                    let file_path = inside(&layer.dir, &path)
                        .ok_or_else(|| io::Error::other("a tar-split name leaves the layer's directory"))?;
                    // Whole files that lie before the range are skipped without reading.
                    if self.hasher.is_none() && self.skip >= size {
                        self.skip -= size;
                        continue;
                    }
                    let mut file = std::fs::File::open(&file_path)?;
                    let mut remaining = size;
                    while remaining > 0 {
                        let want = remaining.min(CHUNK as u64) as usize;
                        let mut buf = Vec::with_capacity(want);
                        let n = (&mut file).take(want as u64).read_to_end(&mut buf)?;
                        if n == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("{} is shorter than the layer says", file_path.display()),
                            ));
                        }
                        remaining -= n as u64;
                        if !self.feed(Bytes::from(buf)) {
                            return Ok(false);
                        }
                    }
                }
            }
        }
        if self.left > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the layer is shorter than its size",
            ));
        }
        Ok(true)
    }

    /// Hashes `bytes` and sends the part inside the range; `false` when nobody listens.
    fn feed(&mut self, mut bytes: Bytes) -> bool {
        if let Some(h) = &mut self.hasher {
            h.update(&bytes);
        }
        if self.skip > 0 {
            let s = self.skip.min(bytes.len() as u64) as usize;
            self.skip -= s as u64;
            bytes = bytes.slice(s..);
        }
        let take = self.left.min(bytes.len() as u64) as usize;
        if take == 0 {
            return true;
        }
        self.left -= take as u64;
        let chunk = bytes.slice(..take);
        if self.hasher.is_none() {
            return self.tx.blocking_send(Ok(chunk)).is_ok();
        }
        match self.held.replace(chunk) {
            Some(previous) => self.tx.blocking_send(Ok(previous)).is_ok(),
            None => true,
        }
    }

    fn release(&mut self) {
        if let Some(last) = self.held.take() {
            let _ = self.tx.blocking_send(Ok(last));
        }
    }

    fn fail(&mut self, e: io::Error) {
        self.held = None;
        let _ = self.tx.blocking_send(Err(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_docker() {
        let a: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let b: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], Digest::of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn names_stay_inside_the_layer() {
        let dir = Path::new("/layer");
        assert_eq!(inside(dir, b"etc/hosts"), Some(PathBuf::from("/layer/etc/hosts")));
        assert_eq!(inside(dir, b"./bin/sh"), Some(PathBuf::from("/layer/./bin/sh")));
        assert_eq!(inside(dir, b"../etc/shadow"), None);
        assert_eq!(inside(dir, b"/etc/shadow"), None);
        assert_eq!(inside(dir, b"a/../../b"), None);
    }
}
