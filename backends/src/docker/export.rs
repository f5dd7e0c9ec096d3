//! Turns an archive read by [`super::archive`] into what ferry serves, for both export formats:
//!
//! - legacy docker-archive (Docker < 25, Podman): `manifest.json` names the config
//!   (`<id>.json`) and the uncompressed layer tars; ferry builds a schema-2 manifest from them
//!   with a fixed field order, so re-exports of one image give the same bytes and digest.
//! - OCI image layout (Docker 25+): `index.json` names the image's own manifest or index,
//!   served as the engine holds it; blobs are `blobs/sha256/<hex>`.
//!
//! Blobs a manifest references but the export lacks are listed, not treated as an error.

use serde::{Deserialize, Serialize};

use ferry_core::{media, BlobStore, Descriptor, Digest, Error, ManifestInfo, Repository, Result};

use super::archive::Archive;

/// The archive format an export came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Legacy,
    Oci,
    /// Not exported: read from the engine's graph-driver storage (the manifest is the one a
    /// legacy export gives).
    Direct,
}

/// One export, interpreted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Exported {
    pub format: Format,
    /// The manifest (or index) served for the image's tag.
    pub top: Digest,
    pub media_type: String,
    /// Every manifest the export holds (top, and the children of an index that are present).
    pub manifests: Vec<Digest>,
    /// Blobs referenced and present.
    pub blobs: Vec<Digest>,
    /// Blobs (or child manifests) referenced but absent from the export.
    pub missing: Vec<Digest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LegacyEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The manifest ferry builds for a legacy export. Field order is the serialisation order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BuiltManifest<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: BuiltDescriptor<'a>,
    layers: Vec<BuiltDescriptor<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BuiltDescriptor<'a> {
    media_type: &'a str,
    size: u64,
    digest: String,
}

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("engine export unusable: {e}"))
}

/// Interprets an archive for the image `wanted` names (`name:tag`, as the engine knows it).
/// A manifest ferry builds is pinned in `archive` with the blobs the export stored.
pub async fn interpret(archive: &mut Archive, store: &BlobStore, repo: &Repository, wanted: &str) -> Result<Exported> {
    if let Some(index) = archive.metadata.get("index.json") {
        oci(archive, store, repo, index).await
    } else if let Some(manifest) = archive.metadata.get("manifest.json").cloned() {
        legacy(archive, store, &manifest, wanted).await
    } else {
        Err(invalid("the archive has neither index.json nor manifest.json"))
    }
}

async fn legacy(archive: &mut Archive, store: &BlobStore, manifest_json: &[u8], wanted: &str) -> Result<Exported> {
    let entries: Vec<LegacyEntry> =
        serde_json::from_slice(manifest_json).map_err(|e| invalid(format!("manifest.json: {e}")))?;
    let entry = entries
        .iter()
        .find(|e| e.repo_tags.iter().flatten().any(|t| t == wanted))
        .or(entries.first())
        .ok_or_else(|| invalid("manifest.json lists no image"))?;
    let file = |path: &str| {
        archive
            .file(path)
            .cloned()
            .ok_or_else(|| invalid(format!("manifest.json names {path}, which the archive lacks")))
    };
    let config = file(&entry.config)?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        layers.push(file(l)?);
    }
    let blobs = std::iter::once(config.0.clone())
        .chain(layers.iter().map(|(d, _)| d.clone()))
        .collect();
    let bytes = schema2_manifest(&config, &layers)?;
    archive.pin(&Digest::of(&bytes));
    let top = store.write_bytes(bytes.into()).await?;
    Ok(Exported {
        format: Format::Legacy,
        top: top.clone(),
        media_type: media::DOCKER_MANIFEST.to_string(),
        manifests: vec![top],
        blobs,
        missing: Vec::new(),
    })
}

/// The schema-2 manifest ferry makes for an image of a legacy export (or read directly):
/// the config and uncompressed layers by digest and size. The same input gives the same
/// bytes, so the digest is stable across exports and between the two ways of reading.
pub fn schema2_manifest(config: &(Digest, u64), layers: &[(Digest, u64)]) -> Result<Vec<u8>> {
    let built = BuiltManifest {
        schema_version: 2,
        media_type: media::DOCKER_MANIFEST,
        config: BuiltDescriptor {
            media_type: media::DOCKER_CONFIG,
            size: config.1,
            digest: config.0.to_string(),
        },
        layers: layers
            .iter()
            .map(|(digest, size)| BuiltDescriptor {
                media_type: media::DOCKER_LAYER_TAR,
                size: *size,
                digest: digest.to_string(),
            })
            .collect(),
    };
    serde_json::to_vec_pretty(&built).map_err(|e| Error::Internal(e.to_string()))
}

/// The OCI manifest Docker 25+ writes into `docker save` for an image of its graph driver:
/// compact JSON, fields in Docker's order, config and uncompressed layers by digest and size.
/// Built the same way, an image read directly keeps the digest its export gives.
pub fn docker_oci_manifest(config: &(Digest, u64), layers: &[(Digest, u64)]) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Desc<'a> {
        media_type: &'a str,
        digest: String,
        size: u64,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Manifest<'a> {
        schema_version: u32,
        media_type: &'a str,
        config: Desc<'a>,
        layers: Vec<Desc<'a>>,
    }
    let m = Manifest {
        schema_version: 2,
        media_type: media::OCI_MANIFEST,
        config: Desc {
            media_type: media::OCI_CONFIG,
            digest: config.0.to_string(),
            size: config.1,
        },
        layers: layers
            .iter()
            .map(|(d, s)| Desc {
                media_type: media::OCI_LAYER_TAR,
                digest: d.to_string(),
                size: *s,
            })
            .collect(),
    };
    serde_json::to_vec(&m).map_err(|e| Error::Internal(e.to_string()))
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<Descriptor>,
}

const NAME_ANNOTATION: &str = "io.containerd.image.name";

async fn oci(archive: &Archive, store: &BlobStore, repo: &Repository, index_json: &[u8]) -> Result<Exported> {
    let index: OciIndex = serde_json::from_slice(index_json).map_err(|e| invalid(format!("index.json: {e}")))?;
    let annotation = |d: &Descriptor, key: &str| {
        d.annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let canonical = repo.canonical();
    let top = index
        .manifests
        .iter()
        .find(|d| {
            annotation(d, NAME_ANNOTATION)
                .is_some_and(|n| n.starts_with(&format!("{canonical}:")) || n.starts_with(&format!("{canonical}@")))
        })
        .or(index.manifests.first())
        .ok_or_else(|| invalid("index.json lists no image"))?;
    // Every blob path is checked against the digest it names.
    let mut present = std::collections::HashSet::new();
    for (path, (digest, _)) in &archive.files {
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            if hex != digest.hex() {
                return Err(invalid(format!("{path} holds content with digest {digest}")));
            }
            present.insert(digest.clone());
        }
    }
    if !present.contains(&top.digest) {
        return Err(invalid(format!(
            "index.json names {}, which the archive lacks",
            top.digest
        )));
    }
    let read = |d: Digest| async move {
        store
            .read(&d)
            .await?
            .ok_or_else(|| invalid(format!("manifest {d} vanished from the cache")))
    };
    let top_bytes = read(top.digest.clone()).await?;
    let top_info = ManifestInfo::parse(&top_bytes, Some(&top.media_type)).map_err(invalid)?;
    let mut manifests = vec![top.digest.clone()];
    let mut blobs = Vec::new();
    let mut missing = Vec::new();
    let mut images = Vec::new();
    if media::is_index(&top_info.media_type) {
        let children: Vec<&Descriptor> = top_info
            .manifests
            .iter()
            .filter(|c| present.contains(&c.digest))
            .collect();
        if children.is_empty() {
            // Not one platform's manifest came along: the export is unusable as it is.
            missing.extend(top_info.manifests.iter().map(|c| c.digest.clone()));
        }
        for c in children {
            manifests.push(c.digest.clone());
            let bytes = read(c.digest.clone()).await?;
            images.push(ManifestInfo::parse(&bytes, Some(&c.media_type)).map_err(invalid)?);
        }
    } else {
        images.push(top_info.clone());
    }
    for info in images {
        for b in info.blobs {
            if present.contains(&b.digest) {
                blobs.push(b.digest);
            } else {
                missing.push(b.digest);
            }
        }
    }
    Ok(Exported {
        format: Format::Oci,
        top: top.digest.clone(),
        media_type: top_info.media_type,
        manifests,
        blobs,
        missing,
    })
}

/// Tag annotation of an OCI export entry, for logs.
pub fn describe(e: &Exported) -> String {
    format!(
        "{:?} export: manifest {} ({}), {} blobs, {} missing",
        e.format,
        e.top,
        e.media_type,
        e.blobs.len(),
        e.missing.len()
    )
}

#[cfg(test)]
mod tests {
    use super::super::pins::Pins;
    use super::*;

    #[tokio::test]
    async fn legacy_manifest_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let mut archive = Archive::new(&Pins::default());
        let config = store
            .write_bytes(bytes::Bytes::from_static(b"{\"rootfs\":{}}"))
            .await
            .unwrap();
        let layer = store.write_bytes(bytes::Bytes::from_static(b"layer")).await.unwrap();
        archive.files.insert("abc.json".into(), (config.clone(), 13));
        archive.files.insert("l1/layer.tar".into(), (layer.clone(), 5));
        archive.metadata.insert(
            "manifest.json".into(),
            br#"[{"Config":"abc.json","RepoTags":["x:1"],"Layers":["l1/layer.tar"]}]"#.to_vec(),
        );
        let repo = Repository::new("docker.io", "x").unwrap();
        let a = interpret(&mut archive, &store, &repo, "x:1").await.unwrap();
        let b = interpret(&mut archive, &store, &repo, "x:1").await.unwrap();
        assert!(archive.pins.contains_key(&a.top), "the built manifest is pinned");
        assert_eq!(a.top, b.top);
        assert_eq!(a.blobs, vec![config, layer]);
        let bytes = store.read(&a.top).await.unwrap().unwrap();
        let info = ManifestInfo::parse(&bytes, None).unwrap();
        assert_eq!(info.media_type, media::DOCKER_MANIFEST);
    }

    #[tokio::test]
    async fn lacking_metadata_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let repo = Repository::new("docker.io", "x").unwrap();
        let mut archive = Archive::new(&Pins::default());
        assert!(interpret(&mut archive, &store, &repo, "x:1").await.is_err());
    }
}
