//! ferry's backends. Each has a serde config type and builds into a [`ferry_core::BackendHandle`].

#![warn(missing_docs)]

pub mod config;
pub mod containerd;
pub mod docker;
pub mod fill;
mod fsutil;
mod outbound;
pub mod push;
pub mod registry;
pub mod size;
pub mod upstream;

pub use config::BackendConfig;
pub use fsutil::probe_writable;
