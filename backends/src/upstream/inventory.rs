//! The upstream cache image by image, for the admin API: a cached manifest that no cached
//! index lists is an image; what it takes is its manifest, the children of it the cache
//! holds, and their blobs. Evicting one image deletes what no other image uses.

use std::collections::{HashMap, HashSet};
use std::time::UNIX_EPOCH;

use ferry_core::manifest::ManifestInfo;
use ferry_core::{BlobStore, Digest, Result};

use super::meta::Meta;

/// One image in the cache.
pub struct Image {
    /// Its manifest (or index).
    pub digest: Digest,
    /// `registry/path:tag` for each tag pointing at it; `registry/path@digest` for an image
    /// pulled by digest only.
    pub names: Vec<String>,
    /// Its manifest, children and blobs that are in the cache.
    pub parts: Vec<Digest>,
    /// Bytes of `parts`.
    pub size: u64,
    /// When its manifest was last served (ms since the epoch).
    pub last_used_ms: u64,
    /// The repositories (`registry/path`) it was fetched for.
    pub repositories: Vec<String>,
}

/// Every image in the cache.
pub async fn images(store: &BlobStore, meta: &Meta) -> Result<Vec<Image>> {
    let mut parsed: HashMap<Digest, ManifestInfo> = HashMap::new();
    for d in meta.manifests().await? {
        let (Some(bytes), Some(media_type)) = (store.read(&d).await?, meta.media_type(&d).await?) else {
            continue;
        };
        if let Ok(info) = ManifestInfo::parse(&bytes, Some(&media_type)) {
            parsed.insert(d, info);
        }
    }
    let children: HashSet<&Digest> = parsed
        .values()
        .flat_map(|i| i.manifests.iter().map(|m| &m.digest))
        .collect();
    // (repository, tag) of each tag, by the manifest it points at.
    let mut tagged: HashMap<Digest, Vec<(String, String)>> = HashMap::new();
    for e in meta.tags().await? {
        tagged.entry(e.digest).or_default().push((e.repository, e.tag));
    }
    let linked = meta.linked_repositories().await?;
    let mut out = Vec::new();
    for (digest, info) in parsed.iter().filter(|(d, _)| !children.contains(d)) {
        let mut wanted = vec![digest.clone()];
        wanted.extend(info.blobs.iter().map(|b| b.digest.clone()));
        for child in &info.manifests {
            if let Some(c) = parsed.get(&child.digest) {
                wanted.push(child.digest.clone());
                wanted.extend(c.blobs.iter().map(|b| b.digest.clone()));
            }
        }
        let mut seen = HashSet::new();
        let (mut parts, mut size) = (Vec::new(), 0);
        for d in wanted {
            if !seen.insert(d.clone()) {
                continue;
            }
            if let Some(s) = store.size(&d).await? {
                size += s;
                parts.push(d);
            }
        }
        let repos = linked.get(digest).map(Vec::as_slice).unwrap_or_default();
        let tags = tagged.remove(digest).unwrap_or_default();
        let mut names: Vec<String> = if tags.is_empty() {
            repos.iter().map(|r| format!("{r}@{digest}")).collect()
        } else {
            tags.iter().map(|(r, t)| format!("{r}:{t}")).collect()
        };
        names.sort();
        let mut repositories: Vec<String> = repos.to_vec();
        repositories.extend(tags.into_iter().map(|(r, _)| r));
        repositories.sort();
        repositories.dedup();
        let last_used_ms = tokio::fs::metadata(store.path(digest))
            .await
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        out.push(Image {
            digest: digest.clone(),
            names,
            parts,
            size,
            last_used_ms,
            repositories,
        });
    }
    out.sort_by_key(|i| std::cmp::Reverse(i.last_used_ms));
    Ok(out)
}

/// Evicts the image whose manifest digest or one of whose names is `image`: deletes its
/// parts that no other image uses, and its tags. Returns (images, bytes deleted).
pub async fn evict(store: &BlobStore, meta: &Meta, image: &str) -> Result<(usize, u64)> {
    let (hit, rest): (Vec<Image>, Vec<Image>) = images(store, meta)
        .await?
        .into_iter()
        .partition(|i| i.digest.to_string() == image || i.names.iter().any(|n| n == image));
    let keep: HashSet<&Digest> = rest.iter().flat_map(|i| &i.parts).collect();
    let gone: HashSet<&Digest> = hit.iter().map(|i| &i.digest).collect();
    for e in meta.tags().await? {
        if gone.contains(&e.digest) {
            meta.remove_entry(&e).await?;
        }
    }
    let mut bytes = 0;
    for d in hit.iter().flat_map(|i| &i.parts).collect::<HashSet<_>>() {
        if keep.contains(d) {
            continue;
        }
        let size = store.size(d).await?.unwrap_or(0);
        if store.delete(d).await? {
            bytes += size;
        }
    }
    Ok((hit.len(), bytes))
}
