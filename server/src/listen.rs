//! The accept loop: hyper serves each connection, with the poem endpoint as its service.
//!
//! poem's own `Server` hands hyper every connection as a boxed stream that does not offer
//! vectored writes, so hyper copies each body chunk into its write buffer before sending it:
//! one more copy of every byte of every blob served (about an eighth of ferry's CPU time on a
//! large blob GET). Given the plain `TcpStream`, hyper writes the chunks as they are.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use poem::endpoint::BoxEndpoint;
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Addr, Endpoint, EndpointExt, Response};
use tokio::net::TcpListener;

use crate::send_timeout::SendTimeout;
use crate::stalled_streams::{Watch, Watched};

/// How long to wait before accepting again after `accept` fails (out of file descriptors,
/// say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What hyper buffers per connection, each way: a request's headers must fit, and a blob
/// body queues at most about this much (beyond the chunk being sent) before the blob's reader
/// waits. Its default (some 400 KiB) made 200 clients pulling at once hold 80 MiB; one
/// client's throughput is the same with 32 KiB (a 256 KiB chunk is queued whole).
const CONNECTION_BUFFER: usize = 32 * 1024;

/// Requests an HTTP/2 connection may have open at once (hyper's default is 200). A pull asks
/// for a handful of layers at a time; a client that opens more waits for one to end. With
/// `server.max_connections` this bounds the streams served at once, and with them the files
/// held open and the chunks in memory: 32 × 4096 by default.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// What one client may hold of the server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time a connection may take to send a request's headers, counted from when the server
    /// waits for them — so it is also how long an idle keep-alive connection stays open.
    pub header_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// At shutdown, how long requests under way may take to finish.
    pub grace: Duration,
    /// How long a response may wait on a client that takes none of it.
    pub send_timeout: Duration,
    /// Each connection's kernel send buffer, in bytes (0: the kernel's choice).
    pub send_buffer: usize,
}

/// Caps what a connection may hold queued in the kernel. Left alone, Linux grows a send
/// buffer up to 4 MiB while the client's window is closed, so a few hundred clients that ask
/// for a blob and stop reading pin gigabytes of kernel memory, and the server spends its CPU
/// filling them. Fixing the size ends the growth; 256 KiB (512 KiB as the kernel counts it)
/// still fills a local link.
fn limit_send_buffer(stream: &tokio::net::TcpStream, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let bytes = bytes.min(i32::MAX as usize / 2);
    if let Err(e) = nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::SndBuf, &bytes) {
        tracing::debug!(error = %e, bytes, "cannot set a connection's send buffer");
    }
}

/// Serves `endpoint` on `listener` until `shutdown` resolves, then lets open connections
/// finish their requests for up to `limits.grace`.
pub async fn serve(
    listener: TcpListener,
    endpoint: impl Endpoint + 'static,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let scheme = if tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP };
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let local = LocalAddr(Addr::SocketAddr(listener.local_addr()?));
    let endpoint: Arc<BoxEndpoint<'static, Response>> = Arc::new(endpoint.map_to_response().boxed());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(CONNECTION_BUFFER);
    builder
        .http2()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(limits.header_timeout);
    // The same HTTP/1 settings, for connections known to be HTTP/1 by their first byte.
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(CONNECTION_BUFFER);
    // Shared, not cloned into each connection's task: the HTTP/2 settings alone are most
    // of a kilobyte.
    let (builder, http1) = (Arc::new(builder), Arc::new(http1));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
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
        limit_send_buffer(&stream, limits.send_buffer);
        let (endpoint, local) = (endpoint.clone(), local.clone());
        let peer = remote;
        let remote = RemoteAddr(Addr::SocketAddr(remote));
        let scheme = scheme.clone();
        let watch = Watch::new(limits.send_timeout);
        let service_watch = watch.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let (endpoint, local, remote, scheme) = (endpoint.clone(), local.clone(), remote.clone(), scheme.clone());
            // Over HTTP/2 a client that stops reading does not block the socket: its
            // responses are watched instead.
            let watch = (req.version() == hyper::Version::HTTP_2)
                .then(|| (service_watch.clone(), req.uri().path().to_string()));
            // Boxed: hyper keeps a slot the size of this future for each HTTP/1 connection's
            // life, where the box lives only until the response's head (2.3 KiB of 8 bytes).
            Box::pin(async move {
                let req = poem::Request::from((req, local, remote, scheme.clone()));
                let response = hyper::Response::from(endpoint.get_response(req).await);
                Ok::<_, Infallible>(match watch {
                    Some((watch, path)) => response.map(|body| watch.watch(body, path)),
                    None => response.map(Watched::unwatched),
                })
            })
        });
        let (builder, http1, watcher, acceptor) =
            (builder.clone(), http1.clone(), graceful.watcher(), acceptor.clone());
        let (header_timeout, send_timeout) = (limits.header_timeout, limits.send_timeout);
        tokio::spawn(async move {
            // Telling HTTP/1 from HTTP/2 waits for the first bytes, before hyper's header
            // timeout starts: a connection that sends nothing is closed here instead.
            let mut first = [0u8; 1];
            if !matches!(
                tokio::time::timeout(header_timeout, stream.peek(&mut first)).await,
                Ok(Ok(1..))
            ) {
                drop(slot);
                return;
            }
            let stream = SendTimeout::new(stream, send_timeout);
            let ended = match acceptor {
                // HTTP/2's preface ("PRI * HTTP/2.0") starts with a P, as do PUT, POST and
                // PATCH; any other first byte is HTTP/1. hyper's HTTP/1 connection alone makes
                // a task of 1.2 KiB; the version-sniffing one, which carries HTTP/2's state
                // and the stalled-stream watch, made it 4.4 KiB (1000 streams: 7 MiB).
                None if first[0] != b'P' => watcher
                    .watch(http1.serve_connection(TokioIo::new(stream), service))
                    .await
                    .map_err(Into::into),
                // Boxed, so that a plain HTTP/1 connection's task does not carry this one.
                None => {
                    Box::pin(async {
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        until_stalled(watcher.watch(conn), &watch, peer).await
                    })
                    .await
                }
                // The handshake is held to the header timeout too. Boxed, as above, so that
                // plain connections do not carry rustls' state.
                Some(acceptor) => {
                    Box::pin(async {
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => {
                                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                                until_stalled(watcher.watch(conn), &watch, peer).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                Ok(())
                            }
                            Err(_) => Ok(()),
                        }
                    })
                    .await
                }
            };
            match ended {
                Err(e) if timed_out(&*e) => {
                    tracing::info!(client = %peer, error = %e, "connection closed: its client stopped reading");
                }
                Err(e) => tracing::debug!(client = %peer, error = %e, "connection ended with an error"),
                Ok(()) => {}
            }
            drop(slot);
        });
    }
    tracing::info!(
        grace_s = limits.grace.as_secs(),
        "no longer accepting; finishing requests under way"
    );
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.grace) => {
            tracing::warn!(grace_s = limits.grace.as_secs(), "connections still busy at shutdown are closed");
        }
    }
    Ok(())
}

/// Serves `conn` until it ends, or until one of its HTTP/2 responses has waited on its
/// client for the send timeout: then the connection is dropped, and with it every stream.
async fn until_stalled<E>(conn: impl Future<Output = Result<(), E>>, watch: &Watch, peer: SocketAddr) -> Result<(), E> {
    tokio::select! {
        ended = conn => ended,
        (request, waited) = watch.stalled() => {
            tracing::info!(client = %peer, request = %request, waited_s = waited.as_secs(),
                "connection closed: its client stopped reading a response (HTTP/2)");
            Ok(())
        }
    }
}

/// Whether `e` comes of a write the client let nothing through for too long.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = c.source();
    }
    false
}
