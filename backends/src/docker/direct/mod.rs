//! Direct reads: an engine image served from the engine's own storage, with no export. The
//! manifest is the one a legacy export gives (same bytes, same digest: a pinned
//! `image@sha256:` works whichever way it is served), the layers are reassembled from their
//! tar-split and files as `docker save` itself does, and each layer is checked against its
//! diff ID — once, remembered — before its last byte goes out. Anything it cannot read
//! (another engine or driver, an unreadable data root, a layer that changed) is served by
//! an export instead, and the log says why once.

mod assemble;
pub mod graph;
pub mod tarsplit;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::{OnceCell, RwLock};

use ferry_core::{media, BlobBody, BlobStore, ByteRange, Digest, Error, Result};

use super::engine::Engine;
use super::export::{docker_oci_manifest, schema2_manifest, Exported, Format};
use graph::{GraphRoot, LayerFiles, Layout};

const UNKNOWN: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

/// A layer served from the engine's storage.
pub struct Layer {
    files: LayerFiles,
    diff_id: Digest,
    /// Bytes of its tar.
    pub size: u64,
    /// Whether its bytes were seen to hash to its diff ID (UNKNOWN, GOOD, BAD).
    state: AtomicU8,
    /// The image it was found for.
    pub image_id: String,
}

impl Layer {
    /// Whether its bytes were found not to hash to its diff ID.
    pub fn is_bad(&self) -> bool {
        self.state.load(Ordering::Relaxed) == BAD
    }
}

/// The direct-read side of one docker backend.
pub struct Direct {
    backend: String,
    enabled: bool,
    root: OnceCell<Option<GraphRoot>>,
    layers: RwLock<HashMap<Digest, Arc<Layer>>>,
    /// Images a direct read failed for: exported from now on.
    refused: RwLock<HashSet<String>>,
}

impl Direct {
    /// `enabled` is the backend's `direct_reads` switch.
    pub fn new(backend: &str, enabled: bool) -> Self {
        Direct {
            backend: backend.to_string(),
            enabled,
            root: OnceCell::new(),
            layers: RwLock::new(HashMap::new()),
            refused: RwLock::new(HashSet::new()),
        }
    }

    /// The engine's storage when ferry can read it, probed on first use and said once.
    async fn root(&self, engine: &Engine) -> Option<&GraphRoot> {
        if !self.enabled {
            return None;
        }
        let probed = self
            .root
            .get_or_try_init(|| async {
                let info = engine.info().await?;
                let layout = if info.product == "Podman" {
                    Layout::ContainersStorage
                } else {
                    Layout::Docker
                };
                let (root, driver, containerd_store) = engine.data_root().await?;
                let verdict = if containerd_store {
                    Err("images live in the containerd store (a containerd backend reads those directly)".to_string())
                } else {
                    GraphRoot::probe(&root, &driver, layout)
                };
                match verdict {
                    Ok(g) => {
                        tracing::info!(backend = %self.backend, root = ?g, "direct reads: layers are served from the engine's storage, with no export");
                        Ok::<_, Error>(Some(g))
                    }
                    Err(why) => {
                        tracing::info!(backend = %self.backend, reason = %why, "direct reads off: images are exported");
                        Ok(None)
                    }
                }
            })
            .await;
        probed.ok().and_then(Option::as_ref)
    }

    /// Whether images are read from the engine's storage (probing it on first use), for
    /// status pages and `ferry doctor`.
    pub async fn in_use(&self, engine: &Engine) -> bool {
        self.root(engine).await.is_some()
    }

    /// Reads image `image_id` from the engine's storage: writes its config and manifest into
    /// `store`, remembers its layers, and says what an export would have. `None` when direct
    /// reads are off for it (the caller exports).
    pub async fn read_image(&self, engine: &Engine, store: &BlobStore, image_id: &str) -> Option<Exported> {
        if self.refused.read().await.contains(image_id) {
            return None;
        }
        let root = self.root(engine).await?.clone();
        // Docker 25 and later export the OCI layout, with a manifest of their own making.
        let oci = engine.info().await.ok().is_some_and(|i| {
            i.product != "Podman"
                && i.version
                    .split('.')
                    .next()
                    .and_then(|m| m.parse::<u32>().ok())
                    .is_some_and(|m| m >= 25)
        });
        let started = std::time::Instant::now();
        match self.read(&root, store, image_id, oci).await {
            Ok(e) => {
                tracing::info!(backend = %self.backend, image = %image_id, manifest = %e.top, layers = e.blobs.len() - 1,
                    elapsed_ms = started.elapsed().as_millis() as u64, "read from the engine's storage (no export)");
                Some(e)
            }
            Err(e) => {
                tracing::warn!(backend = %self.backend, image = %image_id, error = %e,
                    "cannot read this image from the engine's storage; exporting it instead");
                self.refuse(image_id).await;
                None
            }
        }
    }

    async fn read(&self, root: &GraphRoot, store: &BlobStore, image_id: &str, oci: bool) -> Result<Exported> {
        let id: Digest = image_id
            .parse()
            .map_err(|_| Error::Internal(format!("image id {image_id} is not a digest")))?;
        let (root2, id2) = (root.clone(), id.clone());
        let (config, layers) = tokio::task::spawn_blocking(move || -> Result<_> {
            let (config, files) = root2.image(&id2)?.ok_or_else(|| {
                Error::Internal("the image or one of its layers is not in the engine's storage".into())
            })?;
            let mut layers = Vec::new();
            for (diff_id, files) in files {
                let size = tarsplit::tar_size(tarsplit::open(&files.tar_split)?)?;
                layers.push((diff_id, files, size));
            }
            Ok((config, layers))
        })
        .await
        .map_err(|e| Error::Internal(format!("direct read task: {e}")))??;
        let config_desc = (store.write_bytes(config.clone().into()).await?, config.len() as u64);
        let descs: Vec<(Digest, u64)> = layers.iter().map(|(d, _, s)| (d.clone(), *s)).collect();
        let (manifest, media_type) = if oci {
            (docker_oci_manifest(&config_desc, &descs)?, media::OCI_MANIFEST)
        } else {
            (schema2_manifest(&config_desc, &descs)?, media::DOCKER_MANIFEST)
        };
        let top = store.write_bytes(manifest.into()).await?;
        let mut map = self.layers.write().await;
        for (diff_id, files, size) in layers {
            let known = map.get(&diff_id).is_some_and(|l| !l.is_bad());
            if !known {
                map.insert(
                    diff_id.clone(),
                    Arc::new(Layer {
                        files,
                        diff_id,
                        size,
                        state: AtomicU8::new(UNKNOWN),
                        image_id: image_id.to_string(),
                    }),
                );
            }
        }
        Ok(Exported {
            format: Format::Direct,
            top: top.clone(),
            media_type: media_type.to_string(),
            manifests: vec![top],
            blobs: std::iter::once(config_desc.0)
                .chain(descs.into_iter().map(|(d, _)| d))
                .collect(),
            missing: Vec::new(),
        })
    }

    /// Stops reading `image_id` directly (a layer changed under the engine).
    pub async fn refuse(&self, image_id: &str) {
        self.refused.write().await.insert(image_id.to_string());
        self.layers.write().await.retain(|_, l| l.image_id != image_id);
    }

    /// The directly served layer with this digest, if one is known.
    pub async fn layer(&self, digest: &Digest) -> Option<Arc<Layer>> {
        self.layers.read().await.get(digest).cloned()
    }

    /// Whether `exported` was read from the engine's storage and its layers are known here
    /// (after a restart its cache entry is there but its layers are not, until it is read
    /// again).
    pub async fn knows(&self, exported: &Exported) -> bool {
        exported.format == Format::Direct
            && match exported.blobs.get(1) {
                Some(first_layer) => self.layer(first_layer).await.is_some(),
                None => true,
            }
    }

    /// A layer's tar, whole or one range. A range of a layer not yet checked is served once
    /// the whole layer has been read and found to hash right; `None` when it does not (the
    /// caller exports instead).
    pub async fn body(&self, layer: Arc<Layer>, range: Option<ByteRange>) -> Result<Option<BlobBody>> {
        let (offset, len) = match range {
            Some(r) => r.resolve(layer.size)?,
            None => (0, layer.size),
        };
        let whole = offset == 0 && len == layer.size;
        if !whole && layer.state.load(Ordering::Relaxed) == UNKNOWN {
            use futures::StreamExt;
            let mut check = self.stream(layer.clone(), 0, layer.size, true);
            while let Some(chunk) = check.next().await {
                if chunk.is_err() {
                    break;
                }
            }
        }
        if layer.is_bad() {
            return Ok(None);
        }
        let verify = layer.state.load(Ordering::Relaxed) != GOOD;
        Ok(Some(BlobBody {
            size: layer.size,
            range: range.map(|_| (offset, len)),
            stream: self.stream(layer, offset, len, verify && whole),
        }))
    }

    fn stream(&self, layer: Arc<Layer>, offset: u64, len: u64, verify: bool) -> ferry_core::ByteStream {
        let marked = layer.clone();
        assemble::stream(
            layer.files.clone(),
            layer.diff_id.clone(),
            offset,
            len,
            verify,
            move |ok| marked.state.store(if ok { GOOD } else { BAD }, Ordering::Relaxed),
        )
    }
}
