//! The end-to-end suite: the ferry binary against real engines and real clients, one module per
//! area. One binary, so that the harness (this crate's library) is linked once and the areas'
//! tests share the test threads instead of each waiting for its slowest. One area alone:
//! `cargo test -p ferry-e2e --test e2e upstream::`. The hostile-client limits, which time
//! clients and count sockets, run in a binary of their own (`tests/limits.rs`), alone.

mod access;
mod admin;
mod api;
mod chain_matrix;
mod cli;
mod containerd_heal;
mod containerd_origin;
mod contract;
mod cri;
mod direct;
mod docker_engine;
mod docker_engines;
mod docker_legacy;
mod faults;
mod gc;
mod image;
mod library;
mod metrics;
mod push_clients;
mod server_config;
mod test_hosts;
mod tls;
mod trust;
mod upstream;
