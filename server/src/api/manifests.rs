//! `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>`.

use poem::http::{header, StatusCode};
use poem::Body;

use ferry_core::manifest::{media, MAX_MANIFEST_SIZE};
use ferry_core::{Error, ImageRef, Reference};

use super::error::ApiResult;
use super::{empty, set, AppState, Call, BACKEND_HEADER};

pub async fn get(call: &Call<'_>, state: &AppState, name: &str, reference: &str) -> ApiResult {
    let repo = call.repo(name)?;
    // A tag that cannot exist is, for a read, simply not there (as distribution answers); a
    // malformed digest stays a bad request.
    let reference = Reference::parse(reference).map_err(|e| match e {
        Error::TagInvalid(t) => Error::ManifestUnknown(format!("{repo}:{t} (not a valid tag, so no such manifest)")),
        other => other,
    })?;
    let image = ImageRef::new(repo, reference);
    let found = state.chain.manifest(&image, &call.ctx).await?;
    let m = found.value;
    if !accepts(call, &m.media_type) {
        return Err(Error::ManifestUnknown(format!(
            "{image} is a {}, which the request's Accept header does not list",
            m.media_type
        ))
        .into());
    }
    let mut resp = empty(StatusCode::OK);
    let h = resp.headers_mut();
    set(h, "Content-Type", &m.media_type);
    set(h, "Docker-Content-Digest", m.digest.to_string());
    set(h, "ETag", format!("\"{}\"", m.digest));
    set(h, "Content-Length", m.bytes.len().to_string());
    set(h, BACKEND_HEADER, &found.backend);
    if !call.is_head() {
        resp.set_body(m.bytes);
    }
    Ok(resp)
}

/// True unless the client lists manifest media types and this one is not among them.
fn accepts(call: &Call<'_>, media_type: &str) -> bool {
    let listed: Vec<&str> = call
        .req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or(t).trim())
        .collect();
    let names_manifests = listed.iter().any(|t| media::MANIFEST_TYPES.contains(t));
    !names_manifests || listed.iter().any(|t| *t == media_type || *t == "*/*")
}

pub async fn put(call: &Call<'_>, state: &AppState, name: &str, reference: &str, body: Body) -> ApiResult {
    let repo = call.repo(name)?;
    let reference = Reference::parse(reference)?;
    state.registry()?;
    if let Some(len) = call.header(header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok()) {
        if len > DRAIN_LIMIT {
            return Err(Error::ManifestTooLarge {
                size: len,
                limit: MAX_MANIFEST_SIZE,
            }
            .into());
        }
    }
    let bytes = read_limited(super::body::stream(body, state.body_idle), MAX_MANIFEST_SIZE).await?;
    let content_type = call.header(header::CONTENT_TYPE);
    let stored = state
        .chain
        .put_manifest(&repo, &reference, content_type, bytes, &call.ctx)
        .await?;
    let (manifest, subject) = stored.value;
    let mut resp = empty(StatusCode::CREATED);
    let h = resp.headers_mut();
    set(h, "Location", format!("/v2/{name}/manifests/{}", manifest.digest));
    set(h, "Docker-Content-Digest", manifest.digest.to_string());
    if let Some(s) = subject {
        set(h, "OCI-Subject", s.to_string());
    }
    tracing::info!(request = %call.ctx.request_id, image = %ImageRef::new(repo, reference),
        digest = %manifest.digest, media_type = %manifest.media_type, "manifest stored");
    Ok(resp)
}

/// Bodies up to this size are read to the end even when too large, so the client gets to read
/// the 413 instead of a connection reset; larger ones are refused before reading.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// Reads a request body, failing when it passes `limit` bytes.
async fn read_limited(mut stream: ferry_core::ByteStream, limit: u64) -> ApiResult<bytes::Bytes> {
    use futures::StreamExt;
    let mut buf = bytes::BytesMut::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::io("reading manifest body", e))?;
        size += chunk.len() as u64;
        if size <= limit {
            buf.extend_from_slice(&chunk);
        } else if size > DRAIN_LIMIT {
            break;
        }
    }
    if size > limit {
        return Err(Error::ManifestTooLarge { size, limit }.into());
    }
    Ok(buf.freeze())
}

pub async fn delete(call: &Call<'_>, state: &AppState, name: &str, reference: &str) -> ApiResult {
    let repo = call.repo(name)?;
    let reference = Reference::parse(reference)?;
    let (_, registry) = state.registry()?;
    registry.delete_manifest(&repo, &reference).await?;
    tracing::info!(request = %call.ctx.request_id, image = %ImageRef::new(repo, reference), "manifest deleted");
    Ok(empty(StatusCode::ACCEPTED))
}
