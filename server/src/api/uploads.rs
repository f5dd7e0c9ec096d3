//! Blob uploads: `POST /v2/<name>/blobs/uploads/` (monolithic with `?digest=`, mount with
//! `?mount=&from=`, or a session), `PATCH`/`PUT`/`GET`/`DELETE` on `.../uploads/<id>`.

use poem::http::{header, StatusCode};
use poem::{Body, Response};

use ferry_core::{Digest, Error, Repository, UploadState};

use super::error::ApiResult;
use super::{empty, set, AppState, Call};

fn digest_param(call: &Call<'_>) -> ApiResult<Digest> {
    let d = call
        .query
        .digest
        .as_deref()
        .ok_or_else(|| Error::DigestInvalid("the digest query parameter is required".into()))?;
    Ok(d.parse()?)
}

/// 201 for a blob now stored.
fn created(name: &str, digest: &Digest) -> Response {
    let mut resp = empty(StatusCode::CREATED);
    let h = resp.headers_mut();
    set(h, "Location", format!("/v2/{name}/blobs/{digest}"));
    set(h, "Docker-Content-Digest", digest.to_string());
    resp
}

/// 202 (or 204 for a status query) describing an open session.
fn in_progress(status: StatusCode, name: &str, state: &UploadState) -> Response {
    let mut resp = empty(status);
    let h = resp.headers_mut();
    set(h, "Location", format!("/v2/{name}/blobs/uploads/{}", state.id));
    set(h, "Docker-Upload-UUID", &state.id);
    set(h, "Range", format!("0-{}", state.offset.saturating_sub(1)));
    resp
}

pub async fn start(call: &Call<'_>, state: &AppState, name: &str, body: Body) -> ApiResult {
    let repo = call.repo(name)?;
    let (_, registry) = state.registry()?;
    if let Some(mount) = &call.query.mount {
        let digest: Digest = mount.parse()?;
        // Without `from` there is nothing to mount from: the client uploads (202) instead.
        let from = match &call.query.from {
            // A repository outside the prefix allow-list is not one to mount from.
            Some(from) => {
                Some(Repository::from_request(from, call.query.ns.as_deref())?).filter(|r| state.access.allows_name(r))
            }
            None => None,
        };
        let mounted = match &from {
            Some(from) => registry.mount_blob(&repo, &digest, from).await?,
            None => false,
        };
        if mounted {
            tracing::info!(request = %call.ctx.request_id, repository = %repo, %digest, "blob mounted");
            return Ok(created(name, &digest));
        }
    } else if call.query.digest.is_some() {
        let digest = digest_param(call)?;
        let size = registry
            .put_blob(&repo, &digest, super::body::stream(body, state.body_idle))
            .await?;
        tracing::info!(request = %call.ctx.request_id, repository = %repo, %digest, size, "blob stored");
        return Ok(created(name, &digest));
    }
    let upload = registry.start_upload(&repo, &call.ctx).await?;
    Ok(in_progress(StatusCode::ACCEPTED, name, &upload))
}

pub async fn status(call: &Call<'_>, state: &AppState, name: &str, id: &str) -> ApiResult {
    let repo = call.repo(name)?;
    let (_, registry) = state.registry()?;
    let upload = registry.upload_state(&repo, id).await?;
    Ok(in_progress(StatusCode::NO_CONTENT, name, &upload))
}

/// Parses `Content-Range: <start>-<end>` (the spec's form; `bytes ` prefix tolerated).
fn content_range(call: &Call<'_>) -> ApiResult<Option<(u64, u64)>> {
    let Some(v) = call.header(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    match ferry_core::ByteRange::parse_content_range(v) {
        Some(s) => Ok(Some(s)),
        None => Err(Error::UploadOutOfOrder(format!("unusable Content-Range {v:?}")).into()),
    }
}

pub async fn patch(call: &Call<'_>, state: &AppState, name: &str, id: &str, body: Body) -> ApiResult {
    let repo = call.repo(name)?;
    let (_, registry) = state.registry()?;
    let range = content_range(call)?;
    let upload = registry
        .append(&repo, id, range, super::body::stream(body, state.body_idle))
        .await?;
    Ok(in_progress(StatusCode::ACCEPTED, name, &upload))
}

pub async fn finish(call: &Call<'_>, state: &AppState, name: &str, id: &str, body: Body) -> ApiResult {
    let repo = call.repo(name)?;
    let (_, registry) = state.registry()?;
    let digest = digest_param(call)?;
    let size = registry
        .finish_upload(&repo, id, &digest, super::body::stream(body, state.body_idle))
        .await?;
    tracing::info!(request = %call.ctx.request_id, repository = %repo, %digest, size, "blob upload finished");
    Ok(created(name, &digest))
}

pub async fn cancel(call: &Call<'_>, state: &AppState, name: &str, id: &str) -> ApiResult {
    let repo = call.repo(name)?;
    let (_, registry) = state.registry()?;
    registry.cancel_upload(&repo, id).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
