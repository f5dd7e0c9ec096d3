//! The HTTP client of every fetch ferry makes on a client's behalf (heals today, the upstream
//! backend later): its DNS answers and its redirects pass the [`OriginPolicy`], so neither a
//! name that resolves to an internal address nor a redirect to one reaches a service the
//! policy does not name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;

use ferry_core::origin::OriginPolicy;

/// Redirects followed at most (a registry sends a blob to its storage, once).
const MAX_REDIRECTS: usize = 5;

/// Resolves with the system resolver and keeps only the addresses the policy allows for the
/// name; a name left with none fails to resolve, with the policy's reason.
struct PolicyResolver {
    policy: Arc<OriginPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = all
                .into_iter()
                .filter(|a| match policy.check_address(&host, a.ip()) {
                    Ok(()) => true,
                    Err(reason) => {
                        refused = Some(reason);
                        false
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

/// A client builder whose connections and redirects obey `policy`. A redirect may go to any
/// host (registries send blobs to their storage or a CDN) except an internal address the
/// policy does not name; names are checked when they resolve.
pub fn client_builder(policy: Arc<OriginPolicy>) -> reqwest::ClientBuilder {
    let for_redirects = policy.clone();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(PolicyResolver { policy }))
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
pub fn literal_ip(url: &reqwest::Url) -> Option<std::net::IpAddr> {
    url.host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}
