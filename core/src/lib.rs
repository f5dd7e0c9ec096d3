//! ferry's core: the vocabulary shared by the server and the backends. No HTTP, no engine I/O.

#![warn(missing_docs)]

pub mod backend;
pub mod blob_writer;
pub mod blobstore;
pub mod chain;
pub mod chunks;
pub mod contract;
pub mod digest;
pub mod error;
pub mod flight;
pub mod manifest;
pub mod metrics;
pub mod origin;
pub mod prefetch;
pub mod progress;
mod push;
pub mod range;
pub mod reference;
pub mod status;

pub use backend::{Backend, BackendHandle, BlobBody, ByteStream, Registry, RequestCtx, UploadState};
pub use blobstore::BlobStore;
pub use chain::{Chain, Found};
pub use digest::Digest;
pub use error::{Error, Result};
pub use manifest::{media, Descriptor, Manifest, ManifestInfo};
pub use range::ByteRange;
pub use reference::{ImageRef, Reference, Repository, DOCKER_HUB};
