//! One log line per request: method, path, status, bytes sent, duration, the backend that
//! answered and, on 4xx/5xx, the OCI error body. For streamed blobs the line is written when
//! the body has been sent (or the client went away), so bytes and duration are the real ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use poem::{Body, Endpoint, Request, Response};

use super::error::ErrorBody;
use super::BACKEND_HEADER;

/// The operation a request is, for metrics: `manifest_get`, `blob_head`, `upload_patch`, …
/// A bounded set whatever clients send (methods and paths they make up are `other`), so no
/// client can grow the metrics without end.
fn operation(method: &str, path: &str) -> String {
    use super::route::{parse, Resource};
    let method = match method {
        "GET" | "HEAD" | "PUT" | "POST" | "PATCH" | "DELETE" => method.to_ascii_lowercase(),
        _ => "other".to_string(),
    };
    let what = match parse(path) {
        Some(Resource::Base) => "base",
        Some(Resource::Catalog) => "catalog",
        Some(Resource::Tags { .. }) => "tags",
        Some(Resource::Manifest { .. }) => "manifest",
        Some(Resource::Blob { .. }) => "blob",
        Some(Resource::Uploads { .. }) | Some(Resource::Upload { .. }) => "upload",
        Some(Resource::Referrers { .. }) => "referrers",
        None => match path {
            "/healthz" => "healthz",
            "/readyz" => "readyz",
            "/metrics" => "metrics",
            p if p.starts_with("/api/") => "admin",
            _ => "other",
        },
    };
    format!("{what}_{method}")
}

#[cfg(test)]
mod tests {
    use super::operation;

    #[test]
    fn operations_are_a_bounded_set() {
        assert_eq!(operation("GET", "/v2/a/b/manifests/v1"), "manifest_get");
        assert_eq!(operation("HEAD", "/v2/a/blobs/sha256:00"), "blob_head");
        assert_eq!(operation("GET", "/metrics"), "metrics_get");
        assert_eq!(operation("BREW", "/v2/"), "base_other");
        assert_eq!(operation("GET", "/made/up/path/1"), "other_get");
        assert_eq!(operation("GET", "/made/up/path/2"), "other_get");
    }
}

/// Marks a response whose body is streamed; its log line waits for the stream to end.
#[derive(Clone, Copy)]
pub struct Streamed;

struct Line {
    method: String,
    path: String,
    status: u16,
    backend: Option<String>,
    error: Option<String>,
    started: Instant,
    bytes: Arc<AtomicU64>,
    expected: Option<u64>,
}

impl Line {
    fn emit(&self) {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let path = self.path.split('?').next().unwrap_or("");
        ferry_core::metrics::request(&operation(&self.method, path), self.status);
        if let Some(b) = &self.backend {
            ferry_core::metrics::served(b, bytes);
        }
        let duration_ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        let backend = self.backend.as_deref().unwrap_or("-");
        if let Some(error) = &self.error {
            tracing::warn!(target: "ferry::request", method = %self.method, path = %self.path,
                status = self.status, bytes, duration_ms, backend, error = %error, "request failed");
        } else if self.expected.is_some_and(|e| e != bytes) {
            tracing::warn!(target: "ferry::request", method = %self.method, path = %self.path,
                status = self.status, bytes, expected = self.expected, duration_ms, backend,
                "response cut short (client went away or the source failed)");
        } else {
            tracing::info!(target: "ferry::request", method = %self.method, path = %self.path,
                status = self.status, bytes, duration_ms, backend, "request");
        }
    }
}

/// Logs the line when the streamed body is dropped, finished or not.
struct EmitOnDrop(Line);

impl Drop for EmitOnDrop {
    fn drop(&mut self) {
        self.0.emit();
    }
}

pub async fn log_request<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let is_head = req.method() == poem::http::Method::HEAD;
    let mut resp = ep.call(req).await?.into_response_any();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let backend = header(BACKEND_HEADER);
    let expected = header("content-length")
        .and_then(|v| v.parse().ok())
        .filter(|_| !is_head);
    let mut line = Line {
        method,
        path,
        status: resp.status().as_u16(),
        backend,
        error: resp.extensions().get::<ErrorBody>().map(|e| e.0.clone()),
        started,
        bytes: Arc::new(AtomicU64::new(0)),
        expected,
    };
    if resp.extensions().get::<Streamed>().is_some() {
        let guard = EmitOnDrop(line);
        let counter = guard.0.bytes.clone();
        let body = resp.take_body().into_bytes_stream().map(move |chunk| {
            let _keep = &guard;
            if let Ok(c) = &chunk {
                counter.fetch_add(c.len() as u64, Ordering::Relaxed);
            }
            chunk
        });
        resp.set_body(Body::from_bytes_stream(body));
    } else {
        // Bodies that are not streamed are small and already in memory.
        let body = resp.take_body().into_bytes().await.unwrap_or_default();
        if !is_head {
            line.bytes.store(body.len() as u64, Ordering::Relaxed);
        }
        resp.set_body(body);
        line.expected = None;
        line.emit();
    }
    Ok(resp)
}

trait IntoResponseAny {
    fn into_response_any(self) -> Response;
}

impl<T: poem::IntoResponse> IntoResponseAny for T {
    fn into_response_any(self) -> Response {
        self.into_response()
    }
}
