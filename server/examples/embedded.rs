//! ferry inside another program: a chain built from code — a Docker (or Podman) engine,
//! then a push store — served on an address of the caller's choosing.
//!
//! ```sh
//! cargo run -p ferry-server --example embedded -- 127.0.0.1:5000 unix:///var/run/docker.sock /tmp/ferry-data
//! ```

use std::sync::Arc;

use ferry_backends::docker::DockerConfig;
use ferry_backends::push::PushConfig;
use ferry_core::origin::OriginPolicy;
use ferry_core::{BackendHandle, Chain};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:5000".into());
    let socket = args.next();
    let data = std::path::PathBuf::from(args.next().unwrap_or_else(|| "/tmp/ferry-embedded".into()));

    // Fetches on a client's behalf (none here: no pull_missing) only from public registries.
    let origins = Arc::new(OriginPolicy::new(&[], true));
    let docker = DockerConfig {
        name: "engine".into(),
        socket,
        ..DockerConfig::default()
    };
    let push = PushConfig::default();
    let chain = Chain::new(vec![
        BackendHandle::read_only(docker.build(&data, origins).await?),
        BackendHandle::writable(push.build(&data).await?),
    ]);

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("serving {:?} on {}", chain.names(), listener.local_addr()?);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    ferry_server::serve(chain, listener, shutdown, ferry_server::Options::default()).await?;
    Ok(())
}
