//! The one error type of ferry. Every failure a client can see is a variant here; the server
//! turns each variant into an OCI error code and HTTP status in exactly one table.

use std::io;

/// Convenience alias used across the workspace.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while answering a registry request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A repository name breaks the distribution grammar.
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    /// A tag breaks `[a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}`.
    #[error("invalid tag: {0}")]
    TagInvalid(String),
    /// A digest is malformed, or content does not hash to the digest it was sent with.
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    /// A digest algorithm other than sha256.
    #[error("unsupported digest algorithm: {0}")]
    DigestUnsupported(String),
    /// No backend knows this repository.
    #[error("repository not known: {0}")]
    NameUnknown(String),
    /// No backend holds this manifest.
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    /// No backend holds this blob.
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    /// A manifest that cannot be parsed or breaks the image spec.
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    /// A manifest references a blob or manifest the store does not have.
    #[error("manifest references unknown blob: {0}")]
    ManifestBlobUnknown(String),
    /// A manifest larger than the store accepts.
    #[error("manifest too large: {size} bytes, limit {limit}")]
    ManifestTooLarge {
        /// The manifest's size.
        size: u64,
        /// The largest accepted.
        limit: u64,
    },
    /// A blob, or the push store as a whole, would grow past its configured limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The client holds too much of something limited (upload sessions).
    #[error("too many requests: {0}")]
    TooManyRequests(String),
    /// Content length does not match what the client said.
    #[error("size invalid: {0}")]
    SizeInvalid(String),
    /// The upload session does not exist (never did, finished, cancelled or expired).
    #[error("upload unknown: {0}")]
    UploadUnknown(String),
    /// A chunk does not continue the upload where it stands.
    #[error("upload chunk out of order: {0}")]
    UploadOutOfOrder(String),
    /// The upload request is malformed.
    #[error("upload invalid: {0}")]
    UploadInvalid(String),
    /// A query parameter with a value that cannot be used (`n=abc`).
    #[error("invalid query parameter: {0}")]
    QueryInvalid(String),
    /// A `Range` that lies outside the blob.
    #[error("range not satisfiable: {range} of {size} bytes")]
    RangeNotSatisfiable {
        /// The range asked for.
        range: String,
        /// The blob's size.
        size: u64,
    },
    /// The client must authenticate; `realm` goes into the `WWW-Authenticate` challenge.
    #[error("authentication required: {message}")]
    Unauthorized {
        /// The realm for `WWW-Authenticate`.
        realm: String,
        /// What to tell the client.
        message: String,
        /// An origin registry's own `WWW-Authenticate` challenge, passed on as it came so the
        /// client can authenticate with that registry (its token endpoint) and ask again.
        challenge: Option<String>,
    },
    /// The client authenticated but may not do this.
    #[error("access denied: {0}")]
    Denied(String),
    /// The operation is switched off in this configuration or not implemented by any backend.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A backend cannot be reached right now (engine down, socket missing); the chain goes on.
    #[error("backend {backend} unavailable: {reason}")]
    Unavailable {
        /// Which backend.
        backend: String,
        /// Why.
        reason: String,
    },
    /// Local I/O failed (disk full, permissions).
    #[error("i/o error: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        #[source]
        /// The I/O error.
        source: io::Error,
    },
    /// Anything else: a bug or an engine answer we cannot use.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Wraps an I/O error with what was being done, so a log line says which file failed;
    /// a full disk is said as such.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let mut context = context.into();
        if source.kind() == io::ErrorKind::StorageFull {
            context.push_str(": disk full (ENOSPC)");
        }
        Error::Io { context, source }
    }

    /// True for errors that mean "this backend does not have it": the chain asks the next one.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::ManifestUnknown(_) | Error::BlobUnknown(_) | Error::NameUnknown(_)
        )
    }
}

/// A copy, for a result shared by every waiter of one piece of work (an engine pull, an
/// export). An I/O error is copied as its kind and message.
impl Clone for Error {
    fn clone(&self) -> Self {
        match self {
            Error::NameInvalid(m) => Error::NameInvalid(m.clone()),
            Error::TagInvalid(m) => Error::TagInvalid(m.clone()),
            Error::DigestInvalid(m) => Error::DigestInvalid(m.clone()),
            Error::DigestUnsupported(m) => Error::DigestUnsupported(m.clone()),
            Error::NameUnknown(m) => Error::NameUnknown(m.clone()),
            Error::ManifestUnknown(m) => Error::ManifestUnknown(m.clone()),
            Error::BlobUnknown(m) => Error::BlobUnknown(m.clone()),
            Error::ManifestInvalid(m) => Error::ManifestInvalid(m.clone()),
            Error::ManifestBlobUnknown(m) => Error::ManifestBlobUnknown(m.clone()),
            Error::ManifestTooLarge { size, limit } => Error::ManifestTooLarge {
                size: *size,
                limit: *limit,
            },
            Error::SizeInvalid(m) => Error::SizeInvalid(m.clone()),
            Error::TooLarge(m) => Error::TooLarge(m.clone()),
            Error::TooManyRequests(m) => Error::TooManyRequests(m.clone()),
            Error::UploadUnknown(m) => Error::UploadUnknown(m.clone()),
            Error::UploadOutOfOrder(m) => Error::UploadOutOfOrder(m.clone()),
            Error::UploadInvalid(m) => Error::UploadInvalid(m.clone()),
            Error::QueryInvalid(m) => Error::QueryInvalid(m.clone()),
            Error::RangeNotSatisfiable { range, size } => Error::RangeNotSatisfiable {
                range: range.clone(),
                size: *size,
            },
            Error::Unauthorized {
                realm,
                message,
                challenge,
            } => Error::Unauthorized {
                realm: realm.clone(),
                message: message.clone(),
                challenge: challenge.clone(),
            },
            Error::Denied(m) => Error::Denied(m.clone()),
            Error::Unsupported(m) => Error::Unsupported(m.clone()),
            Error::Unavailable { backend, reason } => Error::Unavailable {
                backend: backend.clone(),
                reason: reason.clone(),
            },
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::Internal(m) => Error::Internal(m.clone()),
        }
    }
}

/// An error with its causes, `outer: cause: root cause`: HTTP clients say "error sending
/// request" and keep the reason (refused, a certificate no CA vouches for) in the sources.
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("error sending request")]
    struct Outer(#[source] io::Error);

    #[test]
    fn causes_follow_the_message_once() {
        let e = Outer(io::Error::other("invalid peer certificate: UnknownIssuer"));
        assert_eq!(
            with_causes(&e),
            "error sending request: invalid peer certificate: UnknownIssuer"
        );
        let plain = io::Error::other("refused");
        assert_eq!(with_causes(&plain), "refused");
    }
}
