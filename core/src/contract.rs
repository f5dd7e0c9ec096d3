//! The contracts of [`Backend`] and [`Registry`] as checks every implementation passes: the
//! same questions asked of the push store, the upstream cache, the docker backend (graph
//! drivers, exports, the containerd image store) and the containerd backend, whatever each
//! keeps underneath. A test gives a backend and what it is known to hold (or, for an engine's
//! image whose manifest the backend makes, what [`held`] reads and verifies); a broken promise
//! panics with the backend's name and what differed. Test support: nothing calls it at run time.

use bytes::Bytes;
use futures::StreamExt;

use crate::backend::{Backend, ByteStream, Registry, RequestCtx};
use crate::digest::Digest;
use crate::error::Error;
use crate::manifest::ManifestInfo;
use crate::range::ByteRange;
use crate::reference::{ImageRef, Reference, Repository};

/// An image a backend under test is known to hold.
#[derive(Clone, Debug)]
pub struct Known {
    /// Its repository.
    pub repo: Repository,
    /// A tag that names it there (`None`: the backend serves it by digest only).
    pub tag: Option<String>,
    /// The manifest's bytes as the backend must serve them.
    pub manifest: Bytes,
    /// Its blobs (config and layers), each with its bytes.
    pub blobs: Vec<(Digest, Bytes)>,
}

impl Known {
    fn by_digest(&self) -> ImageRef {
        image(&self.repo, Reference::Digest(Digest::of(&self.manifest)))
    }
}

fn image(repo: &Repository, reference: Reference) -> ImageRef {
    ImageRef::new(repo.clone(), reference)
}

/// What `backend` serves as `repo:tag`, read and verified: the manifest hashes to the digest
/// the backend gives it, and every blob of it (of an index: of its first image) is as long as
/// its descriptor says and hashes to its digest. For an image whose manifest the backend
/// makes itself (an engine's), so there are no bytes to compare it with.
pub async fn held<B: Backend + ?Sized>(backend: &B, repo: &Repository, tag: &str) -> Known {
    let name = backend.name().to_string();
    let ctx = RequestCtx::default();
    let top = image(repo, Reference::Tag(tag.to_string()));
    let m = backend
        .manifest(&top, &ctx)
        .await
        .unwrap_or_else(|e| panic!("{name}: manifest {top}: {e}"))
        .unwrap_or_else(|| panic!("{name}: manifest {top} not found"));
    assert_eq!(
        Digest::of(&m.bytes),
        m.digest,
        "{name}: manifest {top}: digest is not over its bytes"
    );
    let mut info = ManifestInfo::parse(&m.bytes, Some(&m.media_type)).unwrap_or_else(|e| panic!("{name}: {top}: {e}"));
    if let Some(child) = info.manifests.first() {
        let r = image(repo, Reference::Digest(child.digest.clone()));
        let c = backend
            .manifest(&r, &ctx)
            .await
            .unwrap_or_else(|e| panic!("{name}: manifest {r}: {e}"))
            .unwrap_or_else(|| panic!("{name}: manifest {r} of the index not found"));
        assert_eq!(Digest::of(&c.bytes), child.digest, "{name}: manifest {r}: other bytes");
        info = ManifestInfo::parse(&c.bytes, Some(&c.media_type)).unwrap_or_else(|e| panic!("{name}: {r}: {e}"));
    }
    let mut blobs = Vec::new();
    for d in &info.blobs {
        let b = backend
            .blob(repo, &d.digest, None, &ctx)
            .await
            .unwrap_or_else(|e| panic!("{name}: blob {}: {e}", d.digest))
            .unwrap_or_else(|| panic!("{name}: blob {} of {top} not found", d.digest));
        let bytes = collect(b.stream)
            .await
            .unwrap_or_else(|e| panic!("{name}: blob {}: {e}", d.digest));
        assert_eq!(bytes.len() as u64, d.size, "{name}: blob {}: length", d.digest);
        assert_eq!(Digest::of(&bytes), d.digest, "{name}: blob {}: other bytes", d.digest);
        blobs.push((d.digest.clone(), Bytes::from(bytes)));
    }
    Known {
        repo: repo.clone(),
        tag: Some(tag.to_string()),
        manifest: m.bytes,
        blobs,
    }
}

/// Reads a body to its end.
pub async fn collect(mut stream: ByteStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// A body of the given parts, as a request would carry it.
pub fn body(parts: &[&[u8]]) -> ByteStream {
    let parts: Vec<std::io::Result<Bytes>> = parts.iter().map(|p| Ok(Bytes::copy_from_slice(p))).collect();
    futures::stream::iter(parts).boxed()
}

/// The read contract: the manifest by tag and by digest, byte for byte and hashing to its
/// digest; every blob whole, its size without opening it, and ranges of it; `Ok(None)`, never
/// an error, for what the backend does not hold; a tag list that names the tag; ready.
pub async fn check_reads<B: Backend + ?Sized>(backend: &B, known: &Known) {
    let name = backend.name().to_string();
    let ctx = RequestCtx::default();
    assert!(backend.ready().await, "{name}: not ready");

    let digest = Digest::of(&known.manifest);
    let mut refs = vec![known.by_digest()];
    if let Some(tag) = &known.tag {
        refs.push(image(&known.repo, Reference::Tag(tag.clone())));
    }
    for r in &refs {
        let m = backend
            .manifest(r, &ctx)
            .await
            .unwrap_or_else(|e| panic!("{name}: manifest {r}: {e}"))
            .unwrap_or_else(|| panic!("{name}: manifest {r} not found"));
        assert_eq!(m.bytes, known.manifest, "{name}: manifest {r}: bytes differ");
        assert_eq!(m.digest, digest, "{name}: manifest {r}: digest");
        assert!(
            m.missing.is_empty(),
            "{name}: manifest {r}: says it lacks {:?}",
            m.missing
        );
        let declared = serde_json::from_slice::<serde_json::Value>(&m.bytes)
            .ok()
            .and_then(|v| v.get("mediaType").and_then(|t| t.as_str()).map(str::to_string));
        if let Some(declared) = declared {
            assert_eq!(m.media_type, declared, "{name}: manifest {r}: media type");
        }
    }

    for (d, bytes) in &known.blobs {
        assert_eq!(Digest::of(bytes), *d, "the test's own blob {d} is wrong");
        let len = bytes.len() as u64;
        let size = backend.blob_size(&known.repo, d, &ctx).await;
        assert_eq!(size.ok().flatten(), Some(len), "{name}: size of blob {d}");
        let whole = backend
            .blob(&known.repo, d, None, &ctx)
            .await
            .unwrap_or_else(|e| panic!("{name}: blob {d}: {e}"))
            .unwrap_or_else(|| panic!("{name}: blob {d} not found"));
        assert_eq!((whole.size, whole.range), (len, None), "{name}: blob {d}");
        let got = collect(whole.stream)
            .await
            .unwrap_or_else(|e| panic!("{name}: blob {d}: {e}"));
        assert!(
            got == bytes[..],
            "{name}: blob {d}: {} bytes served, not its own",
            got.len()
        );
        if len >= 3 {
            let ranges = [
                (ByteRange::FromTo(1, len - 2), 1, len - 2),
                (ByteRange::From(len / 2), len / 2, len - len / 2),
                (ByteRange::Suffix(2), len - 2, 2),
            ];
            for (range, start, count) in ranges {
                let part = backend
                    .blob(&known.repo, d, Some(range), &ctx)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: blob {d} {range:?}: {e}"))
                    .unwrap_or_else(|| panic!("{name}: blob {d} {range:?} not found"));
                assert_eq!(part.range, Some((start, count)), "{name}: blob {d} {range:?}");
                let got = collect(part.stream)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {range:?}: {e}"));
                let want = &bytes[start as usize..(start + count) as usize];
                assert!(got == want, "{name}: blob {d} {range:?}: other bytes");
            }
            let past = backend
                .blob(&known.repo, d, Some(ByteRange::From(len + 10)), &ctx)
                .await;
            assert!(
                matches!(past, Err(Error::RangeNotSatisfiable { .. })),
                "{name}: blob {d} from past its end: {:?}",
                past.map(|b| b.map(|b| b.range))
            );
        }
    }

    // What it does not hold: "not here", so the chain asks the next backend.
    let absent = Digest::of(format!("not held by {name}").as_bytes());
    let r = image(&known.repo, Reference::Digest(absent.clone()));
    assert!(
        matches!(backend.manifest(&r, &ctx).await, Ok(None)),
        "{name}: a manifest it lacks"
    );
    let r = image(&known.repo, Reference::Tag("no-such-tag-here".into()));
    assert!(
        matches!(backend.manifest(&r, &ctx).await, Ok(None)),
        "{name}: a tag it lacks"
    );
    assert!(
        matches!(backend.blob_size(&known.repo, &absent, &ctx).await, Ok(None)),
        "{name}: size of a blob it lacks"
    );
    assert!(
        matches!(backend.blob(&known.repo, &absent, None, &ctx).await, Ok(None)),
        "{name}: a blob it lacks"
    );

    if let (Some(tag), Ok(Some(tags))) = (&known.tag, backend.tags(&known.repo, &ctx).await) {
        assert!(tags.contains(tag), "{name}: tags {tags:?} lack {tag}");
    }
}

/// The write contract, on an empty repository `repo`: a blob is stored only when it hashes to
/// its digest, a chunked upload only in order, a manifest only when its blobs are there; what
/// is stored reads back through [`check_reads`]; a mount makes a blob known in another
/// repository; a deleted manifest is gone (when the store takes deletes).
pub async fn check_writes<R: Registry + ?Sized>(registry: &R, repo: &Repository) {
    let name = registry.name().to_string();
    let ctx = RequestCtx::default();
    let config =
        Bytes::from_static(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
    let layer = Bytes::from((0..50_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>());
    let (cd, ld) = (Digest::of(&config), Digest::of(&layer));

    // Wrong digest: refused, nothing stored.
    let wrong = registry.put_blob(repo, &Digest::of(b"other"), body(&[&config])).await;
    assert!(
        matches!(wrong, Err(Error::DigestInvalid(_))),
        "{name}: a blob under another digest: {wrong:?}"
    );
    assert!(
        matches!(registry.blob_size(repo, &cd, &ctx).await, Ok(None)),
        "{name}: kept a refused blob"
    );
    assert_eq!(
        registry.put_blob(repo, &cd, body(&[&config])).await.ok(),
        Some(config.len() as u64)
    );

    // A chunked upload: out of order refused and changing nothing; then finished.
    let up = registry
        .start_upload(repo, &ctx)
        .await
        .unwrap_or_else(|e| panic!("{name}: start upload: {e}"));
    let up = registry
        .append(repo, &up.id, None, body(&[&layer[..1000]]))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(up.offset, 1000, "{name}: upload offset");
    let skip = registry
        .append(repo, &up.id, Some((2000, 2009)), body(&[&layer[2000..2010]]))
        .await;
    assert!(
        matches!(skip, Err(Error::UploadOutOfOrder(_))),
        "{name}: a chunk out of order: {skip:?}"
    );
    assert_eq!(
        registry.upload_state(repo, &up.id).await.map(|s| s.offset).ok(),
        Some(1000)
    );
    let stored = registry.finish_upload(repo, &up.id, &ld, body(&[&layer[1000..]])).await;
    assert_eq!(stored.ok(), Some(layer.len() as u64), "{name}: finished upload");
    assert!(
        matches!(registry.upload_state(repo, &up.id).await, Err(Error::UploadUnknown(_))),
        "{name}: a finished upload is still open"
    );

    let manifest = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    ));
    // A manifest whose blob is missing: refused, nothing stored.
    let orphan =
        Bytes::from(String::from_utf8_lossy(&manifest).replace(&ld.to_string(), &Digest::of(b"gone").to_string()));
    let refused = registry
        .put_manifest(repo, &Reference::Tag("orphan".into()), None, orphan)
        .await;
    assert!(
        matches!(refused, Err(Error::ManifestBlobUnknown(_))),
        "{name}: a manifest without its blob: {refused:?}"
    );
    let r = image(repo, Reference::Tag("orphan".into()));
    assert!(
        matches!(registry.manifest(&r, &ctx).await, Ok(None)),
        "{name}: kept a refused manifest"
    );

    let (m, _) = registry
        .put_manifest(repo, &Reference::Tag("v1".into()), None, manifest.clone())
        .await
        .unwrap_or_else(|e| panic!("{name}: put manifest: {e}"));
    assert_eq!(m.digest, Digest::of(&manifest), "{name}: pushed manifest's digest");
    let known = Known {
        repo: repo.clone(),
        tag: Some("v1".into()),
        manifest: manifest.clone(),
        blobs: vec![(cd.clone(), config.clone()), (ld.clone(), layer.clone())],
    };
    check_reads(registry, &known).await;

    // Mounted into another repository: readable there; from one that lacks it: false.
    let other = Repository::new(repo.registry(), &format!("{}-mounted", repo.path())).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(registry.mount_blob(&other, &ld, repo).await, Ok(true)),
        "{name}: mount"
    );
    assert_eq!(
        registry.blob_size(&other, &ld, &ctx).await.ok().flatten(),
        Some(layer.len() as u64)
    );
    let absent = Digest::of(b"never uploaded");
    assert!(
        matches!(registry.mount_blob(&other, &absent, repo).await, Ok(false)),
        "{name}: mount of a blob it lacks"
    );

    match registry
        .delete_manifest(repo, &Reference::Digest(m.digest.clone()))
        .await
    {
        Ok(()) => {
            let gone = registry.manifest(&known.by_digest(), &ctx).await;
            assert!(matches!(gone, Ok(None)), "{name}: a deleted manifest is served");
            let tag = registry.manifest(&image(repo, Reference::Tag("v1".into())), &ctx).await;
            assert!(
                matches!(tag, Ok(None)),
                "{name}: the tag of a deleted manifest is served"
            );
        }
        Err(Error::Unsupported(_)) => {}
        Err(e) => panic!("{name}: delete: {e}"),
    }
}
