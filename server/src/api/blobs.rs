//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`, streamed, with single `Range` support.

use poem::http::{header, StatusCode};
use poem::{Body, Response};

use ferry_core::{ByteRange, Digest};

use super::error::ApiResult;
use super::log::Streamed;
use super::{empty, set, AppState, Call, BACKEND_HEADER};

pub async fn get(call: &Call<'_>, state: &AppState, name: &str, digest: &str) -> ApiResult {
    let repo = call.repo(name)?;
    let digest: Digest = digest.parse()?;
    if call.is_head() {
        let found = state.chain.blob_size(&repo, &digest, &call.ctx).await?;
        let mut resp = empty(StatusCode::OK);
        let h = resp.headers_mut();
        common_headers(h, &digest, &found.backend);
        set(h, "Content-Length", found.value.to_string());
        return Ok(resp);
    }
    let range = call.header(header::RANGE).and_then(ByteRange::parse);
    let found = state.chain.blob(&repo, &digest, range, &call.ctx).await?;
    let body = found.value;
    let len = body.len();
    let status = if body.range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let mut resp = Response::builder()
        .status(status)
        .body(Body::from_bytes_stream(body.stream));
    let h = resp.headers_mut();
    common_headers(h, &digest, &found.backend);
    set(h, "Content-Length", len.to_string());
    if let Some((offset, len)) = body.range {
        set(
            h,
            "Content-Range",
            format!("bytes {offset}-{}/{}", offset + len - 1, body.size),
        );
    }
    resp.extensions_mut().insert(Streamed);
    Ok(resp)
}

fn common_headers(h: &mut poem::http::HeaderMap, digest: &Digest, backend: &str) {
    set(h, "Content-Type", "application/octet-stream");
    set(h, "Docker-Content-Digest", digest.to_string());
    set(h, "ETag", format!("\"{digest}\""));
    set(h, "Accept-Ranges", "bytes");
    set(h, BACKEND_HEADER, backend);
}

pub async fn delete(call: &Call<'_>, state: &AppState, name: &str, digest: &str) -> ApiResult {
    let repo = call.repo(name)?;
    let digest: Digest = digest.parse()?;
    let (_, registry) = state.registry()?;
    registry.delete_blob(&repo, &digest).await?;
    tracing::info!(request = %call.ctx.request_id, repository = %repo, %digest, "blob deleted");
    Ok(empty(StatusCode::ACCEPTED))
}
