//! The push store with no engine and no server: uploads, manifests and their blobs, the
//! per-repository links, and garbage collection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use ferry_core::contract::{body, collect};
use ferry_core::{Backend, Digest, Error, ImageRef, Reference, Registry, Repository, RequestCtx};

use super::{PushBackend, PushConfig};

async fn store(dir: &std::path::Path, config: PushConfig) -> Arc<PushBackend> {
    Arc::new(PushBackend::open(config, dir.to_path_buf()).await.unwrap())
}

fn repo(name: &str) -> Repository {
    Repository::from_request(name, None).unwrap()
}

async fn read(b: &PushBackend, repo: &Repository, digest: &Digest) -> Option<Vec<u8>> {
    let body = b.blob(repo, digest, None, &RequestCtx::default()).await.unwrap()?;
    Some(collect(body.stream).await.unwrap())
}

fn manifest(config: &Digest, config_len: usize, layer: &Digest, layer_len: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_len}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{layer_len}}}]}}"#
    ))
}

#[tokio::test]
async fn a_chunked_upload_is_stored_only_when_it_hashes_to_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let b = store(dir.path(), PushConfig::default()).await;
    let r = repo("team/app");
    let data = b"hello, chunked world".to_vec();
    let digest = Digest::of(&data);
    let ctx = RequestCtx::default();

    let up = b.start_upload(&r, &ctx).await.unwrap();
    let up = b.append(&r, &up.id, None, body(&[&data[..5]])).await.unwrap();
    assert_eq!(up.offset, 5);
    // A chunk that does not start where the last ended is refused, and changes nothing.
    assert!(b.append(&r, &up.id, Some((3, 6)), body(&[b"xyz"])).await.is_err());
    assert_eq!(b.upload_state(&r, &up.id).await.unwrap().offset, 5);
    // The wrong digest: nothing stored.
    let wrong = Digest::of(b"something else");
    let r2 = b.finish_upload(&r, &up.id, &wrong, body(&[&data[5..]])).await;
    assert!(matches!(r2, Err(Error::DigestInvalid(_))), "{r2:?}");
    assert!(read(&b, &r, &wrong).await.is_none());
    assert!(read(&b, &r, &digest).await.is_none());

    let up = b.start_upload(&r, &ctx).await.unwrap();
    let up = b.append(&r, &up.id, None, body(&[&data[..5]])).await.unwrap();
    let size = b.finish_upload(&r, &up.id, &digest, body(&[&data[5..]])).await.unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(read(&b, &r, &digest).await.unwrap(), data);
    // Readable only through a repository it is linked in.
    assert!(read(&b, &repo("team/other"), &digest).await.is_none());
    assert!(b.mount_blob(&repo("team/other"), &digest, &r).await.unwrap());
    assert_eq!(read(&b, &repo("team/other"), &digest).await.unwrap(), data);
    // A cancelled session is gone.
    let up = b.start_upload(&r, &ctx).await.unwrap();
    b.cancel_upload(&r, &up.id).await.unwrap();
    assert!(b.upload_state(&r, &up.id).await.is_err());
}

#[tokio::test]
async fn a_manifest_is_taken_only_with_its_blobs_and_is_served_by_tag_and_digest() {
    let dir = tempfile::tempdir().unwrap();
    let b = store(dir.path(), PushConfig::default()).await;
    let r = repo("team/app");
    let (config, layer) = (b"{}".to_vec(), b"layer bytes".to_vec());
    let (cd, ld) = (Digest::of(&config), Digest::of(&layer));
    let m = manifest(&cd, config.len(), &ld, layer.len());
    let tag = Reference::Tag("v1".into());
    let media = Some("application/vnd.oci.image.manifest.v1+json");
    // Its blobs are not there yet: refused, nothing tagged.
    assert!(b.put_manifest(&r, &tag, media, m.clone()).await.is_err());
    let ctx = RequestCtx::default();
    assert!(b
        .manifest(&ImageRef::new(r.clone(), tag.clone()), &ctx)
        .await
        .unwrap()
        .is_none());
    b.put_blob(&r, &cd, body(&[&config])).await.unwrap();
    b.put_blob(&r, &ld, body(&[&layer])).await.unwrap();
    let (stored, _) = b.put_manifest(&r, &tag, media, m.clone()).await.unwrap();
    assert_eq!(stored.digest, Digest::of(&m));
    for reference in [tag, Reference::Digest(Digest::of(&m))] {
        let got = b
            .manifest(&ImageRef::new(r.clone(), reference), &ctx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.bytes, m);
    }
    assert_eq!(b.tags(&r, &ctx).await.unwrap().unwrap(), vec!["v1".to_string()]);
}

#[tokio::test]
async fn garbage_collection_removes_only_what_no_manifest_references() {
    let dir = tempfile::tempdir().unwrap();
    let b = store(dir.path(), PushConfig::default()).await;
    let r = repo("team/app");
    let (config, layer, stray) = (b"{}".to_vec(), b"kept layer".to_vec(), b"abandoned upload".to_vec());
    let (cd, ld, sd) = (Digest::of(&config), Digest::of(&layer), Digest::of(&stray));
    for (d, data) in [(&cd, &config), (&ld, &layer), (&sd, &stray)] {
        b.put_blob(&r, d, body(&[data])).await.unwrap();
    }
    let m = manifest(&cd, config.len(), &ld, layer.len());
    let media = Some("application/vnd.oci.image.manifest.v1+json");
    b.put_manifest(&r, &Reference::Tag("v1".into()), media, m)
        .await
        .unwrap();
    // Recent blobs stay, referenced or not.
    let report = b.collect_garbage(Duration::from_secs(3600), false).await.unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    // Old enough: a dry run names the stray one and removes nothing; a real run removes it.
    let report = b.collect_garbage(Duration::ZERO, true).await.unwrap();
    assert_eq!(
        report.removed.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
        vec![sd.clone()]
    );
    assert_eq!(read(&b, &r, &sd).await.unwrap(), stray);
    let report = b.collect_garbage(Duration::ZERO, false).await.unwrap();
    assert_eq!(report.bytes(), stray.len() as u64);
    assert!(read(&b, &r, &sd).await.is_none());
    assert_eq!(read(&b, &r, &ld).await.unwrap(), layer);
    assert_eq!(read(&b, &r, &cd).await.unwrap(), config);
}
