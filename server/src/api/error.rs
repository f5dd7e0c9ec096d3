//! The one place where ferry's errors become HTTP statuses and OCI error codes.

use poem::http::{header, HeaderValue, StatusCode};
use poem::{IntoResponse, Response};
use serde_json::json;

use ferry_core::Error;

/// An error on its way to becoming a response.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

/// The OCI error body that went out, kept on the response for the request log line.
#[derive(Clone, Debug)]
pub struct ErrorBody(pub String);

/// The OCI code and HTTP status of each error.
fn code_and_status(e: &Error) -> (&'static str, StatusCode) {
    use Error::*;
    match e {
        NameInvalid(_) => ("NAME_INVALID", StatusCode::BAD_REQUEST),
        TagInvalid(_) => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
        DigestInvalid(_) => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
        DigestUnsupported(_) => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
        NameUnknown(_) => ("NAME_UNKNOWN", StatusCode::NOT_FOUND),
        ManifestUnknown(_) => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
        BlobUnknown(_) => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
        ManifestInvalid(_) => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
        ManifestBlobUnknown(_) => ("MANIFEST_BLOB_UNKNOWN", StatusCode::BAD_REQUEST),
        ManifestTooLarge { .. } => ("SIZE_INVALID", StatusCode::PAYLOAD_TOO_LARGE),
        SizeInvalid(_) => ("SIZE_INVALID", StatusCode::BAD_REQUEST),
        TooLarge(_) => ("SIZE_INVALID", StatusCode::PAYLOAD_TOO_LARGE),
        TooManyRequests(_) => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS),
        UploadUnknown(_) => ("BLOB_UPLOAD_UNKNOWN", StatusCode::NOT_FOUND),
        UploadOutOfOrder(_) => ("BLOB_UPLOAD_INVALID", StatusCode::RANGE_NOT_SATISFIABLE),
        UploadInvalid(_) => ("BLOB_UPLOAD_INVALID", StatusCode::BAD_REQUEST),
        QueryInvalid(_) => ("PAGINATION_NUMBER_INVALID", StatusCode::BAD_REQUEST),
        RangeNotSatisfiable { .. } => ("SIZE_INVALID", StatusCode::RANGE_NOT_SATISFIABLE),
        Unauthorized { .. } => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED),
        Denied(_) => ("DENIED", StatusCode::FORBIDDEN),
        Unsupported(_) => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
        Unavailable { .. } => ("UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE),
        Io { .. } | Internal(_) => ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, status) = code_and_status(&self.0);
        let detail = match &self.0 {
            Error::RangeNotSatisfiable { size, .. } => json!({ "size": size }),
            Error::ManifestTooLarge { size, limit } => json!({ "size": size, "limit": limit }),
            _ => json!({}),
        };
        let body = json!({ "errors": [{ "code": code, "message": self.0.to_string(), "detail": detail }] }).to_string();
        let mut resp = Response::builder()
            .status(status)
            .content_type("application/json")
            .body(body.clone());
        let headers = resp.headers_mut();
        match &self.0 {
            Error::Unauthorized { realm, challenge, .. } => {
                let value = challenge.clone().unwrap_or_else(|| format!("Basic realm=\"{realm}\""));
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Error::RangeNotSatisfiable { size, .. } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        resp.extensions_mut().insert(ErrorBody(body));
        resp
    }
}

/// Handlers return this; `?` turns any core error into the right response.
pub type ApiResult<T = Response> = Result<T, ApiError>;
