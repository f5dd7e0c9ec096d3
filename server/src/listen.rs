//! The accept loop: hyper serves each connection, with the poem endpoint as its service.
//!
//! poem's own `Server` hands hyper every connection as a boxed stream that does not offer
//! vectored writes, so hyper copies each body chunk into its write buffer before sending it:
//! one more copy of every byte of every blob served (about an eighth of ferry's CPU time on a
//! large blob GET). Given the plain `TcpStream`, hyper writes the chunks as they are.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use poem::endpoint::BoxEndpoint;
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Addr, Endpoint, EndpointExt, Response};
use tokio::net::TcpListener;

/// How long to wait before accepting again after `accept` fails (out of file descriptors,
/// say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `endpoint` on `listener` until `shutdown` resolves, then lets open connections
/// finish their requests for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    endpoint: impl Endpoint + 'static,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()> {
    let local = LocalAddr(Addr::SocketAddr(listener.local_addr()?));
    let endpoint: Arc<BoxEndpoint<'static, Response>> = Arc::new(endpoint.map_to_response().boxed());
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Small answers (manifests, HEADs, errors) leave at once instead of waiting on Nagle.
        let _ = stream.set_nodelay(true);
        let (endpoint, local) = (endpoint.clone(), local.clone());
        let remote = RemoteAddr(Addr::SocketAddr(remote));
        let service = hyper::service::service_fn(move |req| {
            let (endpoint, local, remote) = (endpoint.clone(), local.clone(), remote.clone());
            async move {
                let req = poem::Request::from((req, local, remote, Scheme::HTTP));
                Ok::<_, Infallible>(hyper::Response::from(endpoint.get_response(req).await))
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_s = grace.as_secs(), "connections still busy at shutdown are closed");
        }
    }
    Ok(())
}
