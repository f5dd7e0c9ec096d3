//! Docker's graph-driver storage, read directly: an image's config from
//! `image/<driver>/imagedb/content/sha256/<id>`, each layer's tar recipe from
//! `image/<driver>/layerdb/sha256/<chain id>/tar-split.json.gz` and its files from the
//! driver's directory for the layer's `cache-id` (`overlay2/<cache-id>/diff`,
//! `vfs/dir/<cache-id>`). Nothing here writes.

use std::io;
use std::path::{Component, Path, PathBuf};

use ferry_core::{Digest, Error, Result};

/// How the engine lays its storage out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Docker's layer store: `image/<driver>/...` and the driver's directories.
    Docker,
    /// containers/storage (Podman, rootful and rootless): `<driver>-images/images.json`,
    /// `<driver>-layers/layers.json` and `<id>.tar-split.gz`, files under the driver's
    /// directory.
    ContainersStorage,
}

/// An engine's data root whose storage ferry can read.
#[derive(Clone, Debug)]
pub struct GraphRoot {
    root: PathBuf,
    driver: String,
    layout: Layout,
}

/// An image as the engine stores it: its config bytes, and each layer's diff ID and files,
/// bottom first.
pub type StoredImage = (Vec<u8>, Vec<(Digest, LayerFiles)>);

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
    pub fn probe(root: &Path, driver: &str, layout: Layout) -> std::result::Result<Self, String> {
        let known = match layout {
            Layout::Docker => matches!(driver, "overlay2" | "vfs"),
            Layout::ContainersStorage => matches!(driver, "overlay" | "vfs"),
        };
        if !known {
            return Err(format!(
                "storage driver {driver} is not one ferry reads (overlay2 or overlay, vfs)"
            ));
        }
        let g = GraphRoot {
            root: root.to_path_buf(),
            driver: driver.to_string(),
            layout,
        };
        // The data root itself: an engine with no image yet has no layer store below it, and
        // a root this user may not enter (Docker's is 0710) is what makes direct reads fail.
        let probe = g.root.clone();
        std::fs::read_dir(&probe).map_err(|e| {
            format!(
                "cannot read {} ({e}): mount the data root read-only into ferry's container, or run ferry as root",
                probe.display()
            )
        })?;
        Ok(g)
    }

    /// The image's config and its layers' files, bottom first, each with the diff ID the
    /// config gives it; `None` when the engine has no such image (any more).
    pub fn image(&self, image_id: &Digest) -> Result<Option<StoredImage>> {
        let Some(config) = self.config(image_id)? else {
            return Ok(None);
        };
        if Digest::of(&config) != *image_id {
            return Err(Error::Internal(
                "the stored config does not hash to the image id".into(),
            ));
        }
        #[derive(serde::Deserialize)]
        struct RootFs {
            diff_ids: Vec<Digest>,
        }
        #[derive(serde::Deserialize)]
        struct Config {
            rootfs: RootFs,
        }
        let diff_ids = serde_json::from_slice::<Config>(&config)
            .map_err(|e| Error::Internal(format!("image config: {e}")))?
            .rootfs
            .diff_ids;
        let files = match self.layout {
            Layout::Docker => {
                let mut files = Vec::new();
                for chain in chain_ids(&diff_ids) {
                    match self.layer(&chain)? {
                        Some(f) => files.push(f),
                        None => return Ok(None),
                    }
                }
                files
            }
            Layout::ContainersStorage => match self.storage_layers(image_id, &diff_ids)? {
                Some(f) => f,
                None => return Ok(None),
            },
        };
        Ok(Some((config, diff_ids.into_iter().zip(files).collect())))
    }

    /// containers/storage: the image's top layer and its parents, checked against `diff_ids`.
    fn storage_layers(&self, image_id: &Digest, diff_ids: &[Digest]) -> Result<Option<Vec<LayerFiles>>> {
        #[derive(serde::Deserialize)]
        struct Image {
            id: String,
            #[serde(default)]
            layer: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct StoredLayer {
            id: String,
            #[serde(default)]
            parent: Option<String>,
            #[serde(rename = "diff-digest", default)]
            diff_digest: Option<String>,
        }
        let read = |name: &str| -> Result<Vec<u8>> {
            let p = self.root.join(name);
            std::fs::read(&p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
        };
        let images: Vec<Image> = serde_json::from_slice(&read(&format!("{}-images/images.json", self.driver))?)
            .map_err(|e| Error::Internal(format!("images.json: {e}")))?;
        let Some(top) = images
            .into_iter()
            .find(|i| i.id == image_id.hex())
            .and_then(|i| i.layer)
        else {
            return Ok(None);
        };
        let layers: Vec<StoredLayer> = serde_json::from_slice(&read(&format!("{}-layers/layers.json", self.driver))?)
            .map_err(|e| Error::Internal(format!("layers.json: {e}")))?;
        let by_id: std::collections::HashMap<&str, &StoredLayer> = layers.iter().map(|l| (l.id.as_str(), l)).collect();
        let mut chain = Vec::new();
        let mut next = Some(top.as_str());
        while let Some(id) = next {
            let Some(l) = by_id.get(id) else { return Ok(None) };
            if chain.len() > diff_ids.len() {
                return Err(Error::Internal("the layer chain is longer than the config says".into()));
            }
            chain.push(*l);
            next = l.parent.as_deref();
        }
        chain.reverse();
        if chain.len() != diff_ids.len() {
            return Err(Error::Internal(
                "the layer chain does not match the config's diff ids".into(),
            ));
        }
        let mut out = Vec::new();
        for (l, diff_id) in chain.iter().zip(diff_ids) {
            if l.diff_digest.as_deref() != Some(diff_id.to_string().as_str()) || l.id.contains(['/', '.']) {
                return Err(Error::Internal(format!("layer {} is not the config's {diff_id}", l.id)));
            }
            out.push(LayerFiles {
                tar_split: self.root.join(format!("{}-layers/{}.tar-split.gz", self.driver, l.id)),
                dir: match self.driver.as_str() {
                    "overlay" => self.root.join("overlay").join(&l.id).join("diff"),
                    _ => self.root.join("vfs/dir").join(&l.id),
                },
            });
        }
        Ok(Some(out))
    }

    fn image_dir(&self) -> PathBuf {
        self.root.join("image").join(&self.driver)
    }

    /// The image's config as the engine stores it (its digest is the image id), or `None`.
    fn config(&self, image_id: &Digest) -> Result<Option<Vec<u8>>> {
        let path = match self.layout {
            Layout::Docker => self.image_dir().join("imagedb/content/sha256").join(image_id.hex()),
            // A big-data item, named by the base64 of its key.
            Layout::ContainersStorage => {
                use base64::Engine as _;
                let key = base64::engine::general_purpose::STANDARD.encode(image_id.to_string());
                self.root
                    .join(format!("{}-images", self.driver))
                    .join(image_id.hex())
                    .join(format!("={key}"))
            }
        };
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// The files of the Docker layer with chain id `chain`, or `None` when the engine has no
    /// such layer (any more).
    fn layer(&self, chain: &Digest) -> Result<Option<LayerFiles>> {
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
pub(super) fn inside(dir: &Path, name: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let rel = Path::new(std::ffi::OsStr::from_bytes(name));
    rel.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| dir.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::direct::assemble::stream;
    use ferry_core::ByteStream;

    #[test]
    fn chain_ids_follow_docker() {
        let a: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let b: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], Digest::of(format!("{a} {b}").as_bytes()));
    }

    /// A layer directory and a tar-split of `entries` (`None` content: a raw segment).
    fn layer(dir: &Path, lines: &[String]) -> LayerFiles {
        use std::io::Write;
        let ts = dir.join("tar-split.json.gz");
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&ts).unwrap(), flate2::Compression::fast());
        for l in lines {
            writeln!(gz, "{l}").unwrap();
        }
        gz.finish().unwrap();
        LayerFiles {
            tar_split: ts,
            dir: dir.join("diff"),
        }
    }

    fn raw(b: &[u8]) -> String {
        use base64::Engine as _;
        format!(
            r#"{{"type":2,"payload":"{}"}}"#,
            base64::engine::general_purpose::STANDARD.encode(b)
        )
    }

    fn file(name: &str, size: usize) -> String {
        format!(r#"{{"type":1,"name":"{name}","size":{size}}}"#)
    }

    async fn collect(s: ByteStream) -> (Vec<u8>, bool) {
        use futures::StreamExt;
        let mut out = Vec::new();
        let mut s = s;
        while let Some(c) = s.next().await {
            match c {
                Ok(b) => out.extend_from_slice(&b),
                Err(_) => return (out, false),
            }
        }
        (out, true)
    }

    #[tokio::test]
    async fn assembles_checks_and_serves_ranges() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("diff/etc")).unwrap();
        std::fs::write(t.path().join("diff/etc/hosts"), b"127.0.0.1 x\n").unwrap();
        let files = layer(t.path(), &[raw(b"HEAD"), file("etc/hosts", 12), raw(b"PAD")]);
        let whole = b"HEAD127.0.0.1 x\nPAD".to_vec();
        let right = Digest::of(&whole);
        let (tx, rx) = std::sync::mpsc::channel();
        let (bytes, ok) = collect(stream(files.clone(), right.clone(), 0, 19, true, move |v| {
            tx.send(v).unwrap()
        }))
        .await;
        assert!(ok && rx.recv().unwrap());
        assert_eq!(bytes, whole);
        let (part, ok) = collect(stream(files.clone(), right, 2, 6, false, |_| {})).await;
        assert!(ok);
        assert_eq!(part, whole[2..8]);
        // The wrong diff ID: the response ends in an error, never with the whole tar.
        let wrong = Digest::of(b"something else");
        let (tx, rx) = std::sync::mpsc::channel();
        let (bytes, ok) = collect(stream(files, wrong, 0, 19, true, move |v| tx.send(v).unwrap())).await;
        assert!(!ok && !rx.recv().unwrap());
        assert!(bytes.len() < whole.len());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn every_range_of_a_layer_is_its_bytes() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("diff")).unwrap();
        std::fs::write(t.path().join("diff/a"), b"alpha").unwrap();
        std::fs::write(t.path().join("diff/b"), b"").unwrap();
        std::fs::write(t.path().join("diff/c"), b"charlie-c").unwrap();
        let files = layer(
            t.path(),
            &[
                raw(b"H1"),
                file("a", 5),
                raw(b"H2"),
                file("b", 0),
                raw(b""),
                file("c", 9),
                raw(b"END"),
            ],
        );
        let whole = b"H1alphaH2charlie-cEND".to_vec();
        let id = Digest::of(&whole);
        for offset in 0..whole.len() {
            for len in 0..=whole.len() - offset {
                let (part, ok) = collect(stream(
                    files.clone(),
                    id.clone(),
                    offset as u64,
                    len as u64,
                    false,
                    |_| {},
                ))
                .await;
                assert!(ok, "{offset}+{len}");
                assert_eq!(part, whole[offset..offset + len], "{offset}+{len}");
            }
        }
        // Content longer than a chunk comes whole, in order, and verified.
        let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(t.path().join("diff/big"), &big).unwrap();
        let files = layer(t.path(), &[raw(b"H"), file("big", big.len()), raw(b"T")]);
        let mut whole = b"H".to_vec();
        whole.extend_from_slice(&big);
        whole.push(b'T');
        let (tx, rx) = std::sync::mpsc::channel();
        let size = whole.len() as u64;
        let (bytes, ok) = collect(stream(files.clone(), Digest::of(&whole), 0, size, true, move |v| {
            tx.send(v).unwrap()
        }))
        .await;
        assert!(ok && rx.recv().unwrap());
        assert_eq!(bytes, whole);
        for (offset, len) in [(1, 700_000), (300_000, 1), (262_143, 262_146), (699_990, 11)] {
            let (part, ok) = collect(stream(files.clone(), Digest::of(b"x"), offset, len, false, |_| {})).await;
            assert!(ok);
            assert_eq!(part, whole[offset as usize..(offset + len) as usize], "{offset}+{len}");
        }
        // A file shorter than the tar-split says: an error, and the verdict false.
        std::fs::write(t.path().join("diff/big"), &big[..1000]).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (bytes, ok) = collect(stream(files, Digest::of(&whole), 0, size, true, move |v| {
            tx.send(v).unwrap()
        }))
        .await;
        assert!(!ok && !rx.recv().unwrap());
        assert!(bytes.len() < whole.len());
    }

    #[tokio::test]
    async fn a_symlink_out_of_the_layer_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("diff")).unwrap();
        std::fs::create_dir_all(t.path().join("outside")).unwrap();
        std::fs::write(t.path().join("outside/secret"), b"host secret").unwrap();
        std::os::unix::fs::symlink(t.path().join("outside"), t.path().join("diff/a")).unwrap();
        let files = layer(t.path(), &[raw(b"H"), file("a/secret", 11)]);
        let (bytes, ok) = collect(stream(files, Digest::of(b"x"), 0, 12, false, |_| {})).await;
        assert!(!ok);
        assert!(!bytes.windows(6).any(|w| w == b"secret"), "{bytes:?}");
    }

    #[test]
    fn an_engine_with_no_image_yet_can_be_read() {
        // Found by the load bench: a fresh engine has no layer store yet, and probing for one
        // turned direct reads off for good.
        let t = tempfile::tempdir().unwrap();
        assert!(GraphRoot::probe(t.path(), "overlay2", Layout::Docker).is_ok());
        assert!(GraphRoot::probe(&t.path().join("missing"), "overlay2", Layout::Docker).is_err());
        assert!(GraphRoot::probe(t.path(), "btrfs", Layout::Docker).is_err());
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
