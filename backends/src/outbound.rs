//! The HTTP client of every fetch ferry makes on a client's behalf (heals, the upstream
//! backend, their token endpoints and redirects): the [`OriginPolicy`] is asked three times,
//! so that no spelling, DNS answer or redirect reaches a service the policy does not name:
//! - a redirect to an IP literal is judged before it is followed;
//! - a name's DNS answers are filtered as it resolves ([`PolicyResolver`]);
//! - every connection, once made and before a byte of a request goes out on it, is judged by
//!   its socket's own peer address ([`PeerCheck`]): the check that holds however the host was
//!   written, resolved or redirected.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connection, HttpInfo};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;

use ferry_core::origin::{canonical_registry, is_internal, OriginPolicy};

/// Redirects followed at most (a registry sends a blob to its storage, once).
const MAX_REDIRECTS: usize = 5;

/// Internal addresses that a name the policy lists (or the proxy) resolved to: the
/// connection check lets these through, as the resolver did. Bounded: when full it starts
/// again (a name's address is vouched for again on its next resolution).
#[derive(Default)]
struct Vouched {
    ips: Mutex<HashSet<IpAddr>>,
}

/// Internal addresses remembered at most.
const VOUCHED_MAX: usize = 4096;

impl Vouched {
    fn add(&self, ip: IpAddr) {
        let mut ips = self.ips.lock().unwrap_or_else(|e| e.into_inner());
        if ips.len() >= VOUCHED_MAX {
            ips.clear();
        }
        ips.insert(ip.to_canonical());
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ips = self.ips.lock().unwrap_or_else(|e| e.into_inner());
        ips.contains(&ip.to_canonical())
    }
}

/// The hosts of the proxies reqwest takes from the environment (`HTTPS_PROXY` and the
/// rest), canonical: connections to the operator's own proxy are not a client's choice.
fn proxy_hosts() -> Vec<String> {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .filter_map(|v| std::env::var(v).ok())
    .filter_map(|u| {
        let u = if u.contains("://") { u } else { format!("http://{u}") };
        reqwest::Url::parse(&u).ok()
    })
    .filter_map(|u| u.host_str().and_then(|h| canonical_registry(h).ok()))
    .collect()
}

/// Resolves with the system resolver and keeps only the addresses the policy allows for the
/// name; a name left with none fails to resolve, with the policy's reason.
struct PolicyResolver {
    policy: Arc<OriginPolicy>,
    vouched: Arc<Vouched>,
    proxies: Arc<Vec<String>>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let (policy, vouched, proxies) = (self.policy.clone(), self.vouched.clone(), self.proxies.clone());
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let proxy = canonical_registry(&host).is_ok_and(|h| proxies.contains(&h));
            let mut refused = None;
            let allowed: Vec<SocketAddr> = all
                .into_iter()
                .filter(|a| match policy.check_address(&host, a.ip()) {
                    _ if proxy => true,
                    Ok(()) => true,
                    Err(reason) => {
                        refused = Some(reason);
                        false
                    }
                })
                .inspect(|a| {
                    if is_internal(a.ip()) {
                        vouched.add(a.ip());
                    }
                })
                .collect();
            if allowed.is_empty() {
                let reason = refused.unwrap_or_else(|| format!("{host} has no address"));
                return Err(reason.into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps the client's connector: a connection is handed on only when its peer address passes
/// [`OriginPolicy::check_connection`], or the resolver vouched for it; else it is closed
/// before anything is sent on it, and the fetch fails with the policy's reason.
#[derive(Clone)]
struct PeerCheckLayer {
    policy: Arc<OriginPolicy>,
    vouched: Arc<Vouched>,
}

impl<S> tower::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;

    fn layer(&self, inner: S) -> PeerCheck<S> {
        PeerCheck {
            inner,
            check: self.clone(),
        }
    }
}

/// The connector of [`PeerCheckLayer`].
#[derive(Clone)]
struct PeerCheck<S> {
    inner: S,
    check: PeerCheckLayer,
}

impl PeerCheckLayer {
    fn judge(&self, peer: Option<SocketAddr>) -> Result<(), String> {
        let Some(peer) = peer else {
            return Err("a connection with no peer address".into());
        };
        if self.vouched.contains(peer.ip()) {
            return Ok(());
        }
        self.policy.check_connection(peer.ip()).map_err(|reason| {
            tracing::warn!(%peer, %reason, "refused an outbound connection");
            format!("connection to {peer} refused: {reason}")
        })
    }
}

impl<S, R> tower::Service<R> for PeerCheck<S>
where
    S: tower::Service<R, Error = BoxError>,
    S::Response: Connection + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: R) -> Self::Future {
        let connecting = self.inner.call(dst);
        let check = self.check.clone();
        Box::pin(async move {
            let conn = connecting.await?;
            let mut extras = http::Extensions::new();
            conn.connected().get_extras(&mut extras);
            check.judge(extras.get::<HttpInfo>().map(|i| i.remote_addr()))?;
            Ok(conn)
        })
    }
}

/// A client builder whose connections and redirects obey `policy`. A redirect may go to any
/// host (registries send blobs to their storage or a CDN) except an internal address the
/// policy does not name; names are checked when they resolve, and every connection on its
/// peer address.
pub fn client_builder(policy: Arc<OriginPolicy>) -> reqwest::ClientBuilder {
    let for_redirects = policy.clone();
    let vouched = Arc::new(Vouched::default());
    let proxies = proxy_hosts();
    for ip in proxies.iter().filter_map(|h| ferry_core::origin::literal(h)) {
        vouched.add(ip);
    }
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(PolicyResolver {
            policy: policy.clone(),
            vouched: vouched.clone(),
            proxies: Arc::new(proxies),
        }))
        .connector_layer(PeerCheckLayer { policy, vouched })
        .redirect(redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            let scheme = attempt.url().scheme().to_string();
            if !matches!(scheme.as_str(), "http" | "https") {
                return attempt.error(format!("redirect to a {scheme} URL"));
            }
            let refused = match literal_ip(attempt.url()) {
                _ if attempt.url().host_str().is_none() => Some("redirect without a host".to_string()),
                Some(ip) => for_redirects.check_address(&authority(attempt.url()), ip).err(),
                None => None, // a name: checked when it resolves
            };
            match refused {
                Some(reason) => attempt.error(reason),
                None => attempt.follow(),
            }
        }))
}

/// `host` or `host:port` of a URL, as a registry is named in `[origins] allow`.
pub fn authority(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("");
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// The URL's host when it is an IP address rather than a name.
pub fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    ferry_core::origin::literal(url.host_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback stand-in that answers 200 to what it is sent; counts the requests it saw
    /// (connections that brought at least one byte).
    async fn stand_in(ip: &str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        (addr, seen)
    }

    fn client(allow: &[&str]) -> reqwest::Client {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        client_builder(Arc::new(OriginPolicy::new(&allow, false)))
            .no_proxy()
            .build()
            .unwrap()
    }

    /// The check on the socket holds without any check before it: a URL sent straight to the
    /// client, in any spelling, never gets a request to an address the policy does not name.
    #[tokio::test]
    async fn a_connection_to_an_address_not_named_carries_no_request() {
        let (addr, seen) = stand_in("127.0.0.1").await;
        let (addr6, seen6) = stand_in("::1").await;
        let port = addr.port();
        let c = client(&["*"]);
        for url in [
            format!("http://127.0.0.1:{port}/v2/"),
            format!("http://127.1:{port}/v2/"),
            format!("http://0x7f000001:{port}/v2/"),
            format!("http://2130706433:{port}/v2/"),
            format!("http://0177.0.0.1:{port}/v2/"),
            format!("http://127.000.000.001:{port}/v2/"),
            format!("http://0:{port}/v2/"),
            format!("http://LOCALHOST.:{port}/v2/"),
            format!("http://[::ffff:127.0.0.1]:{port}/v2/"),
            format!("http://[::1]:{}/v2/", addr6.port()),
            format!("http://[0:0::1]:{}/v2/", addr6.port()),
        ] {
            let r = c.get(&url).send().await;
            assert!(r.is_err(), "{url} was fetched");
        }
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the stand-in saw a request"
        );
        assert_eq!(
            seen6.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the IPv6 stand-in saw a request"
        );
        // Named, in any spelling, it is reached in any spelling.
        let c = client(&[&format!("0x7f.1:{port}"), "[0::1]"]);
        for url in [
            format!("http://127.0.0.1:{port}/v2/"),
            format!("http://2130706433:{port}/v2/"),
            format!("http://[::1]:{}/v2/", addr6.port()),
        ] {
            let r = c.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "{url}");
        }
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(seen6.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A name that resolves to loopback and is named is vouched for by the resolver.
        let c = client(&["localhost"]);
        let r = c.get(format!("http://localhost:{port}/v2/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}
