//! Which hosts ferry — or the engine, on ferry's behalf — may fetch from for a client.
//!
//! A client chooses the origin of a request (`?ns=`, or the first path component), so without
//! a policy anyone who reaches ferry could make it, and the engine beside it, connect to any
//! host and port: a port scanner, and a way into services that listen on loopback or on the
//! cloud metadata address. Every outbound fetch asks this one type:
//! - a registry is contacted only when it is listed: the public registries below by default,
//!   plus the hosts the config names (`*.example.com` names every subdomain, `*` any host);
//! - an address that is loopback, private, link-local (the metadata address among them),
//!   unique-local, unspecified or multicast is connected to only when its host is listed by
//!   its exact name (never through a wildcard), whether it came as an IP literal, from DNS,
//!   or from a redirect;
//! - the client's credentials go only to the registry they were sent for, or to a token
//!   endpoint in the same domain.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::reference::DOCKER_HUB;

/// Registries fetched from by default: the public ones clusters pull from.
pub const PUBLIC_REGISTRIES: &[&str] = &[
    "docker.io",
    "registry-1.docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "k8s.gcr.io",
    "gcr.io",
    "*.gcr.io",
    "*.pkg.dev",
    "public.ecr.aws",
    "mcr.microsoft.com",
    "nvcr.io",
    "registry.gitlab.com",
    "docker.elastic.co",
    "lscr.io",
    "cgr.dev",
];

/// The policy: the listed hosts, lowercased, as `host`, `host:port`, `*.domain` or `*`.
#[derive(Clone, Debug)]
pub struct OriginPolicy {
    listed: Vec<String>,
}

impl Default for OriginPolicy {
    fn default() -> Self {
        OriginPolicy::new(&[], true)
    }
}

/// Splits `host[:port]` (IPv6 in brackets) into host and port.
pub fn split_host(registry: &str) -> (&str, Option<&str>) {
    if let Some(rest) = registry.strip_prefix('[') {
        if let Some((h, tail)) = rest.split_once(']') {
            return (h, tail.strip_prefix(':'));
        }
    }
    match registry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => (h, Some(p)),
        _ => (registry, None),
    }
}

/// True for addresses that are not the public internet: loopback, private, link-local
/// (169.254.169.254, the cloud metadata address, among them), carrier-grade NAT, unique-local,
/// unspecified, broadcast, documentation and multicast ranges, and IPv4 mapped into IPv6.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            let seg0 = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg0 & 0xfe00) == 0xfc00 // unique local
                || (seg0 & 0xffc0) == 0xfe80 // link-local
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) // AWS metadata (IPv6)
        }
    }
}

fn is_internal_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
        || a >= 240
}

impl OriginPolicy {
    /// The public registries (when `public_defaults`) plus `allow`.
    pub fn new(allow: &[String], public_defaults: bool) -> Self {
        let mut listed: Vec<String> = allow.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
        if public_defaults {
            listed.extend(PUBLIC_REGISTRIES.iter().map(|h| h.to_string()));
        }
        listed.retain(|h| !h.is_empty());
        OriginPolicy { listed }
    }

    /// This policy with more hosts named (a backend's own list, e.g. its `plain_http` hosts).
    pub fn with_named(&self, more: &[String]) -> OriginPolicy {
        let mut listed = self.listed.clone();
        listed.extend(
            more.iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty()),
        );
        OriginPolicy { listed }
    }

    /// Whether `registry` (`host[:port]`) is named exactly, with its port or without.
    fn named_exactly(&self, registry: &str) -> bool {
        let registry = registry.to_ascii_lowercase();
        let (host, _) = split_host(&registry);
        self.listed.iter().any(|l| *l == registry || *l == host)
    }

    /// Whether `registry` is listed, exactly, through a `*.domain` wildcard or through `*`.
    fn listed(&self, registry: &str) -> bool {
        if self.named_exactly(registry) {
            return true;
        }
        let registry = registry.to_ascii_lowercase();
        let (host, _) = split_host(&registry);
        self.listed.iter().any(|l| {
            l == "*"
                || l.strip_prefix("*.")
                    .is_some_and(|domain| host.ends_with(&format!(".{domain}")))
        })
    }

    /// Whether a client may make ferry fetch from `registry`; the reason when not.
    pub fn check_registry(&self, registry: &str) -> Result<(), String> {
        let registry = if registry == DOCKER_HUB { DOCKER_HUB } else { registry };
        let (host, _) = split_host(registry);
        let internal = match host.parse::<IpAddr>() {
            Ok(ip) => is_internal(ip),
            Err(_) => host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost"),
        };
        if internal {
            if self.named_exactly(registry) {
                return Ok(());
            }
            return Err(format!(
                "{registry} is a loopback, private or link-local address, and such origins are fetched from \
                 only when [origins] allow names them exactly"
            ));
        }
        if self.listed(registry) {
            Ok(())
        } else {
            Err(format!("{registry} is not in [origins] allow"))
        }
    }

    /// Whether ferry may connect to `ip`, which `host` (a listed registry, a token endpoint
    /// or a redirect target) resolved to or named.
    pub fn check_address(&self, host: &str, ip: IpAddr) -> Result<(), String> {
        if !is_internal(ip) || self.named_exactly(host) {
            Ok(())
        } else {
            Err(format!(
                "{host} resolves to {ip}, a loopback, private or link-local address that [origins] allow does not name"
            ))
        }
    }

    /// Whether the credentials a client sent for `registry` may go to `realm_host`, the host
    /// of a token endpoint the registry named: the same host, or one in the same domain
    /// (Docker Hub's `auth.docker.io` for `registry-1.docker.io`).
    pub fn credentials_may_go(&self, registry: &str, realm_host: &str) -> bool {
        let (reg_host, _) = split_host(registry);
        let reg_host = if registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            reg_host
        };
        let (realm_host, _) = split_host(realm_host);
        let (a, b) = (reg_host.to_ascii_lowercase(), realm_host.to_ascii_lowercase());
        if a == b {
            return true;
        }
        if a.parse::<IpAddr>().is_ok() || b.parse::<IpAddr>().is_ok() {
            return false;
        }
        let domain = |h: &str| {
            let labels: Vec<&str> = h.rsplitn(3, '.').collect();
            (labels.len() >= 2).then(|| format!("{}.{}", labels[1], labels[0]))
        };
        domain(&a).is_some_and(|d| Some(d) == domain(&b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> OriginPolicy {
        OriginPolicy::new(&allow.iter().map(|s| s.to_string()).collect::<Vec<_>>(), true)
    }

    #[test]
    fn public_registries_by_default_and_nothing_else() {
        let p = OriginPolicy::default();
        for ok in [
            "docker.io",
            "ghcr.io",
            "registry.k8s.io",
            "eu.gcr.io",
            "europe-docker.pkg.dev",
        ] {
            assert!(p.check_registry(ok).is_ok(), "{ok}");
        }
        for no in [
            "attacker.example:5111",
            "evil.com",
            "gcr.io.evil.com",
            "pkg.dev.evil.com",
        ] {
            assert!(p.check_registry(no).is_err(), "{no}");
        }
    }

    #[test]
    fn internal_addresses_only_when_named_exactly() {
        let p = policy(&["*", "*.corp.example", "127.0.0.1:5001", "10.213.4.2", "reg.lan"]);
        for no in [
            "127.0.0.1:5111",
            "localhost:5000",
            "169.254.169.254",
            "169.254.169.254:80",
            "10.0.0.1:5000",
            "192.168.1.10",
            "172.16.0.1",
            "[::1]:5000",
            "[fd00:ec2::254]",
            "[fe80::1]",
            "[::ffff:127.0.0.1]:5000",
            "0.0.0.0:5000",
            "100.64.0.1",
        ] {
            assert!(p.check_registry(no).is_err(), "{no} must be refused even with *");
        }
        assert!(p.check_registry("127.0.0.1:5001").is_ok());
        assert!(
            p.check_registry("10.213.4.2:5000").is_ok(),
            "named without a port: any port"
        );
        // Names: a wildcard allows the name, but not an internal address it resolves to.
        assert!(p.check_registry("reg.corp.example").is_ok());
        let internal: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(p.check_address("reg.corp.example", internal).is_err());
        assert!(p.check_address("reg.lan", internal).is_ok());
        assert!(p.check_address("cdn.example", "93.184.216.34".parse().unwrap()).is_ok());
        assert!(p
            .check_address("metadata.example", "169.254.169.254".parse().unwrap())
            .is_err());
    }

    #[test]
    fn a_backends_own_hosts_count_as_named() {
        let p = OriginPolicy::default().with_named(&["10.0.0.5:5000".to_string()]);
        assert!(p.check_registry("10.0.0.5:5000").is_ok());
        assert!(OriginPolicy::default().check_registry("10.0.0.5:5000").is_err());
    }

    #[test]
    fn credentials_stay_in_the_registrys_domain() {
        let p = OriginPolicy::default();
        assert!(p.credentials_may_go("docker.io", "auth.docker.io"));
        assert!(p.credentials_may_go("ghcr.io", "ghcr.io"));
        assert!(p.credentials_may_go("127.0.0.1:5000", "127.0.0.1:5001"));
        assert!(!p.credentials_may_go("ghcr.io", "attacker.example"));
        assert!(!p.credentials_may_go("127.0.0.1:5000", "127.0.0.2"));
        assert!(!p.credentials_may_go("quay.io", "quay.io.evil.com"));
    }
}
