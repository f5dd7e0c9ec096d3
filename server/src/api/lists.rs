//! Listings: `GET /v2/<name>/tags/list`, `GET /v2/_catalog` (both paginated with `n`/`last`
//! and a `Link` header), and `GET /v2/<name>/referrers/<digest>`.

use poem::Response;
use serde_json::json;

use ferry_core::{media, Digest, Error};

use super::error::ApiResult;
use super::{set, AppState, Call};

/// Applies `last` (start after this entry) and `n` (at most this many); returns the page and
/// whether more entries follow.
fn paginate(all: Vec<String>, call: &Call<'_>) -> ApiResult<(Vec<String>, bool)> {
    let n = match call.query.n.as_deref() {
        Some(n) => Some(
            n.parse::<usize>()
                .map_err(|_| Error::QueryInvalid(format!("n={n:?} is not a number")))?,
        ),
        None => None,
    };
    let mut page: Vec<String> = match &call.query.last {
        Some(last) => all.into_iter().filter(|t| t > last).collect(),
        None => all,
    };
    let more = n.is_some_and(|n| page.len() > n);
    if let Some(n) = n {
        page.truncate(n);
    }
    Ok((page, more))
}

fn page_response(body: serde_json::Value, next: Option<String>) -> Response {
    let mut resp = Response::builder()
        .content_type("application/json")
        .body(body.to_string());
    if let Some(next) = next {
        set(resp.headers_mut(), "Link", format!("<{next}>; rel=\"next\""));
    }
    resp
}

pub async fn tags(call: &Call<'_>, state: &AppState, name: &str) -> ApiResult {
    let repo = call.repo(name)?;
    let all = state.chain.tags(&repo, &call.ctx).await?;
    let (page, more) = paginate(all, call)?;
    let next = more.then(|| next_link(&format!("/v2/{name}/tags/list"), call, page.last()));
    Ok(page_response(json!({ "name": name, "tags": page }), next))
}

pub async fn catalog(call: &Call<'_>, state: &AppState) -> ApiResult {
    let mut all = state.chain.catalog().await?;
    // Names outside the prefix allow-list are not shown.
    all.retain(|name| ferry_core::Repository::from_request(name, None).is_ok_and(|r| state.access.allows_name(&r)));
    let (page, more) = paginate(all, call)?;
    let next = more.then(|| next_link("/v2/_catalog", call, page.last()));
    Ok(page_response(json!({ "repositories": page }), next))
}

fn next_link(path: &str, call: &Call<'_>, last: Option<&String>) -> String {
    let n = call.query.n.as_deref().unwrap_or_default();
    let mut link = format!("{path}?n={n}&last={}", last.map(String::as_str).unwrap_or_default());
    if let Some(ns) = &call.query.ns {
        link.push_str(&format!("&ns={ns}"));
    }
    link
}

pub async fn referrers(call: &Call<'_>, state: &AppState, name: &str, digest: &str) -> ApiResult {
    let repo = call.repo(name)?;
    let digest: Digest = digest.parse()?;
    let mut all = state.chain.referrers(&repo, &digest, &call.ctx).await?;
    let filter = call.query.artifact_type.as_deref();
    if let Some(t) = filter {
        all.retain(|d| d.artifact_type.as_deref() == Some(t));
    }
    let body = json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": all });
    let mut resp = Response::builder()
        .content_type(media::OCI_INDEX)
        .body(body.to_string());
    if filter.is_some() {
        set(resp.headers_mut(), "OCI-Filters-Applied", "artifactType");
    }
    Ok(resp)
}
