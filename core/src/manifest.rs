//! Manifests as bytes plus what ferry needs to know about them: media type, digest, and the
//! descriptors they reference. The bytes are never re-serialised: the digest is of the bytes.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Media types ferry reads and writes.
pub mod media {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI uncompressed layer.
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    /// Docker schema-2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker uncompressed layer.
    pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
    /// Docker gzip layer.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    /// The manifest media types ferry stores and serves.
    pub const MANIFEST_TYPES: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

    /// True for the list/index types, whose entries are manifests rather than blobs.
    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_LIST
    }
}

/// The largest manifest ferry accepts or serves, as distribution and containerd do.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// A content descriptor as the image spec defines it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the content is.
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Where else it may be fetched from.
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Annotations, as written.
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// An artifact's type.
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// For an index's entries: the platform, as written.
    pub platform: Option<serde_json::Value>,
}

/// The fields of an image manifest or index that ferry looks at; everything else is kept in
/// the bytes untouched.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Parsed {
    schema_version: Option<u32>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    subject: Option<Descriptor>,
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A manifest as served: its exact bytes, its media type and its digest.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The manifest exactly as stored: its digest is over these bytes.
    pub bytes: Bytes,
    /// Its media type (`Content-Type`).
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Blobs this manifest needs that the answering backend knows it lacks (an engine export
    /// that dropped them). The chain serves such a manifest only when a later backend holds
    /// every one of them.
    pub missing: Vec<Digest>,
}

impl Manifest {
    /// Wraps manifest bytes read from a trusted source (a store or an engine), taking the
    /// media type from the JSON and the digest from the bytes.
    pub fn from_bytes(bytes: Bytes) -> Result<Self> {
        let info = ManifestInfo::parse(&bytes, None)?;
        Ok(Manifest {
            digest: Digest::of(&bytes),
            media_type: info.media_type,
            bytes,
            missing: Vec::new(),
        })
    }
}

/// What a manifest references, for validation on push and for the referrers API.
#[derive(Clone, Debug)]
pub struct ManifestInfo {
    /// The manifest's media type, from its JSON or the client's `Content-Type`.
    pub media_type: String,
    /// Blobs: the config and the layers (for an image manifest).
    pub blobs: Vec<Descriptor>,
    /// Child manifests (for an index or list).
    pub manifests: Vec<Descriptor>,
    /// The manifest it refers to (referrers API).
    pub subject: Option<Descriptor>,
    /// `artifactType`, or for an image manifest without one, its config's media type.
    pub artifact_type: Option<String>,
    /// Its annotations, for the referrers list.
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ManifestInfo {
    /// Parses and validates manifest bytes. `content_type` is the type the client declared
    /// (the `Content-Type` of a push); when the JSON has a `mediaType` too, they must agree.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Self> {
        let p: Parsed = serde_json::from_slice(bytes)
            .map_err(|e| Error::ManifestInvalid(format!("not a manifest JSON document: {e}")))?;
        let content_type = content_type
            .map(|c| c.split(';').next().unwrap_or(c).trim())
            .filter(|c| media::MANIFEST_TYPES.contains(c));
        let media_type = match (&p.media_type, content_type) {
            (Some(m), Some(c)) if m != c => {
                return Err(Error::ManifestInvalid(format!(
                    "mediaType {m} differs from Content-Type {c}"
                )))
            }
            (Some(m), _) => m.clone(),
            (None, Some(c)) => c.to_string(),
            // An OCI manifest or index may omit mediaType; tell them apart by shape.
            (None, None) if p.config.is_some() => media::OCI_MANIFEST.to_string(),
            (None, None) if !p.manifests.is_empty() => media::OCI_INDEX.to_string(),
            (None, None) => {
                return Err(Error::ManifestInvalid(
                    "no mediaType and no Content-Type naming a manifest type".into(),
                ))
            }
        };
        if !media::MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(Error::ManifestInvalid(format!(
                "unsupported manifest media type {media_type}"
            )));
        }
        if p.schema_version != Some(2) {
            return Err(Error::ManifestInvalid("schemaVersion must be 2".into()));
        }
        let mut blobs = Vec::new();
        let mut manifests = Vec::new();
        if media::is_index(&media_type) {
            if p.config.is_some() || !p.layers.is_empty() {
                return Err(Error::ManifestInvalid("an index has no config or layers".into()));
            }
            manifests = p.manifests;
        } else {
            let config = p
                .config
                .ok_or_else(|| Error::ManifestInvalid("image manifest without config".into()))?;
            blobs.push(config);
            blobs.extend(p.layers);
        }
        let artifact_type = p.artifact_type.or_else(|| {
            blobs
                .first()
                .map(|c| c.media_type.clone())
                .filter(|_| !media::is_index(&media_type))
        });
        Ok(ManifestInfo {
            media_type,
            blobs,
            manifests,
            subject: p.subject,
            artifact_type,
            annotations: p.annotations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

    #[test]
    fn reads_media_type_and_references() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{CONFIG}","size":2}},"layers":[]}}"#,
            media::DOCKER_MANIFEST,
            media::DOCKER_CONFIG
        );
        let info = ManifestInfo::parse(m.as_bytes(), None).unwrap();
        assert_eq!(info.media_type, media::DOCKER_MANIFEST);
        assert_eq!(info.blobs.len(), 1);
        assert!(ManifestInfo::parse(m.as_bytes(), Some(media::OCI_MANIFEST)).is_err());
    }

    #[test]
    fn rejects_garbage() {
        for bad in [&b"not json"[..], b"{}", b"[]", br#"{"schemaVersion":1}"#] {
            assert!(matches!(ManifestInfo::parse(bad, None), Err(Error::ManifestInvalid(_))));
        }
    }
}
