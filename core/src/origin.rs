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
//! - a host is judged in its canonical form ([`canonical_registry`]: the URL standard's
//!   parser, the one the HTTP client uses), so no other spelling of an address (`127.1`,
//!   `0x7f000001`, `[::ffff:127.0.0.1]`) passes for a name; and every connection is checked
//!   again on its socket's own address ([`OriginPolicy::check_connection`]);
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

/// The policy: the listed hosts in their canonical form (see [`canonical_registry`]), as
/// `host`, `host:port`, `*.domain` or `*`.
#[derive(Clone, Debug)]
pub struct OriginPolicy {
    listed: Vec<String>,
    /// The IP addresses the list names by their literal (`10.0.0.5`, `127.0.0.1:5001`): the
    /// only internal addresses a connection may reach without a name the list holds.
    named_ips: Vec<IpAddr>,
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

/// A registry `host[:port]` as the HTTP client will connect to it, so that the policy, the
/// cache and the connection agree on which host it is. The host goes through the URL
/// standard's host parser, the one every fetch's URL goes through: `127.1`, `0x7f.0.0.1`,
/// `2130706433` and `0177.0.0.01` all become `127.0.0.1`, `[::FFFF:7f00:1]` becomes
/// `[::ffff:127.0.0.1]`, names are lower-cased (and IDNA-encoded) and lose one trailing dot;
/// the port loses its leading zeros. An IPv6 address must be in brackets.
pub fn canonical_registry(registry: &str) -> Result<String, String> {
    let bad = |why: &str| format!("{registry:?} is not a registry host: {why}");
    let (host, port) = if registry.starts_with('[') {
        let (h, tail) = registry.split_once(']').ok_or_else(|| bad("no closing bracket"))?;
        let port = match tail {
            "" => None,
            t => Some(t.strip_prefix(':').ok_or_else(|| bad("text after the address"))?),
        };
        (format!("{h}]"), port)
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (registry.to_string(), None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().map_err(|_| bad("port out of range"))?)
        }
        Some(_) => return Err(bad("the port is not a number")),
    };
    let host = match url::Host::parse(&host).map_err(|e| bad(&e.to_string()))? {
        url::Host::Domain(d) => {
            let d = d.strip_suffix('.').unwrap_or(&d).to_ascii_lowercase();
            if d.is_empty() || d.ends_with('.') {
                return Err(bad("empty label"));
            }
            d
        }
        url::Host::Ipv4(v4) => v4.to_string(),
        url::Host::Ipv6(v6) => format!("[{v6}]"),
    };
    Ok(match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    })
}

/// The canonical form of `registry`, or the text lower-cased when it is no host at all (a
/// pattern, or a mistake that then names nothing).
fn canonical_or_lowercase(registry: &str) -> String {
    let trimmed = registry.trim();
    canonical_registry(trimmed).unwrap_or_else(|_| trimmed.to_ascii_lowercase())
}

/// The address a host (IPv6 in brackets) names when it is an IP literal rather than a name
/// (IPv4 mapped into IPv6 as IPv4).
pub fn literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
}

/// True for addresses that are not the public internet: loopback, private, link-local
/// (169.254.169.254, the cloud metadata address, among them), carrier-grade NAT, unique-local,
/// unspecified, broadcast, documentation and multicast ranges, and IPv4 mapped into or
/// carried in IPv6 (IPv4-compatible, NAT64, 6to4) when that IPv4 address is one of them.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4() {
                // `::a.b.c.d` (IPv4-compatible) and `::ffff:a.b.c.d` (mapped); `::` and `::1`
                // come out as 0.0.0.0 and 0.0.0.1, internal too.
                return is_internal_v4(v4);
            }
            let seg = v6.segments();
            let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && is_internal_v4(embedded(seg[6], seg[7])) {
                return true; // NAT64
            }
            if seg[0] == 0x2002 && is_internal_v4(embedded(seg[1], seg[2])) {
                return true; // 6to4
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
                || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated, still routed by some)
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
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240
}

impl OriginPolicy {
    /// The public registries (when `public_defaults`) plus `allow`.
    pub fn new(allow: &[String], public_defaults: bool) -> Self {
        let mut listed: Vec<String> = allow.to_vec();
        if public_defaults {
            listed.extend(PUBLIC_REGISTRIES.iter().map(|h| h.to_string()));
        }
        OriginPolicy::from_listed(listed)
    }

    fn from_listed(listed: Vec<String>) -> Self {
        let listed: Vec<String> = listed
            .iter()
            .filter(|h| !h.trim().is_empty())
            .map(|h| match h.trim().strip_prefix("*.") {
                Some(domain) => format!("*.{}", canonical_or_lowercase(domain)),
                None if h.trim() == "*" => "*".to_string(),
                None => canonical_or_lowercase(h),
            })
            .collect();
        let named_ips = listed.iter().filter_map(|l| literal(split_host(l).0)).collect();
        OriginPolicy { listed, named_ips }
    }

    /// This policy with more hosts named (a backend's own list, e.g. its `plain_http` hosts).
    pub fn with_named(&self, more: &[String]) -> OriginPolicy {
        let mut listed = self.listed.clone();
        listed.extend(more.iter().cloned());
        OriginPolicy::from_listed(listed)
    }

    /// Whether `registry` (`host[:port]`) is named exactly, with its port or without.
    fn named_exactly(&self, registry: &str) -> bool {
        let registry = canonical_or_lowercase(registry);
        let (host, _) = split_host(&registry);
        self.listed.iter().any(|l| *l == registry || *l == host)
    }

    /// Whether the list names `host` (no port) exactly, with any port or none: a name that
    /// resolves to an internal address may lead there.
    pub fn names_host(&self, host: &str) -> bool {
        let host = canonical_or_lowercase(host);
        self.listed.iter().any(|l| split_host(l).0 == host)
    }

    /// Whether `registry` is listed, exactly, through a `*.domain` wildcard or through `*`.
    fn listed(&self, registry: &str) -> bool {
        if self.named_exactly(registry) {
            return true;
        }
        let registry = canonical_or_lowercase(registry);
        let (host, _) = split_host(&registry);
        self.listed.iter().any(|l| {
            l == "*"
                || l.strip_prefix("*.")
                    .is_some_and(|domain| host.ends_with(&format!(".{domain}")))
        })
    }

    /// Whether a client may make ferry fetch from `registry`; the reason when not. The
    /// registry is judged in its canonical form, however it was written.
    pub fn check_registry(&self, registry: &str) -> Result<(), String> {
        let registry = if registry == DOCKER_HUB {
            DOCKER_HUB.to_string()
        } else {
            canonical_registry(registry)?
        };
        let (host, _) = split_host(&registry);
        let internal = match literal(host) {
            Some(ip) => is_internal(ip),
            None => host == "localhost" || host.ends_with(".localhost"),
        };
        if internal {
            if self.named_exactly(&registry) {
                return Ok(());
            }
            return Err(format!(
                "{registry} is a loopback, private or link-local address, and such origins are fetched from \
                 only when [origins] allow names them exactly"
            ));
        }
        if self.listed(&registry) {
            Ok(())
        } else {
            Err(format!("{registry} is not in [origins] allow"))
        }
    }

    /// Whether ferry may connect to `ip`, which `host` (`host[:port]`: a listed registry, a
    /// token endpoint or a redirect target) resolved to or named. A name counts as named
    /// whatever port the list gives it; an IP literal's port must match an entry with one.
    pub fn check_address(&self, host: &str, ip: IpAddr) -> Result<(), String> {
        let named = if literal(split_host(host).0).is_some() {
            self.named_exactly(host)
        } else {
            self.names_host(split_host(host).0)
        };
        if !is_internal(ip) || named {
            Ok(())
        } else {
            Err(format!(
                "{host} resolves to {ip}, a loopback, private or link-local address that [origins] allow does not name"
            ))
        }
    }

    /// Whether a connection may go to `ip`, judged with nothing but the address — the last
    /// check, on the socket itself: a public address, or an internal one the list names by
    /// its literal. (Internal addresses of listed names are vouched for by whoever resolved
    /// them; see [`OriginPolicy::check_address`].)
    pub fn check_connection(&self, ip: IpAddr) -> Result<(), String> {
        let ip = ip.to_canonical();
        if !is_internal(ip) || self.named_ips.contains(&ip) {
            Ok(())
        } else {
            Err(format!(
                "{ip} is a loopback, private or link-local address that [origins] allow does not name"
            ))
        }
    }

    /// Whether the credentials a client sent for `registry` may go to `realm_host`, the host
    /// of a token endpoint the registry named: the same host, or one in the same domain
    /// (Docker Hub's `auth.docker.io` for `registry-1.docker.io`).
    pub fn credentials_may_go(&self, registry: &str, realm_host: &str) -> bool {
        let registry = if registry == DOCKER_HUB {
            "registry-1.docker.io".to_string()
        } else {
            canonical_or_lowercase(registry)
        };
        let realm_host = canonical_or_lowercase(realm_host);
        let (a, b) = (split_host(&registry).0, split_host(&realm_host).0);
        if a == b {
            return true;
        }
        if literal(a).is_some() || literal(b).is_some() {
            return false;
        }
        let domain = |h: &str| {
            let labels: Vec<&str> = h.rsplitn(3, '.').collect();
            (labels.len() >= 2).then(|| format!("{}.{}", labels[1], labels[0]))
        };
        domain(a).is_some_and(|d| Some(d) == domain(b))
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
    fn no_spelling_of_an_internal_address_passes_a_wildcard() {
        let p = policy(&["*"]);
        for no in [
            "127.1:5001",
            "0x7f.1:5001",
            "0x7f000001:5001",
            "2130706433:5001",
            "017700000001:5001",
            "0177.0.0.1:5001",
            "127.000.000.001:5001",
            "127.0.0.1.:5001",
            "0:5001",
            "[::ffff:127.0.0.1]:5001",
            "[::ffff:7f00:1]:5001",
            "[::127.0.0.1]:5001",
            "[0:0:0:0:0:0:0:1]:5001",
            "[64:ff9b::a9fe:a9fe]",
            "[2002:a9fe:a9fe::1]",
            "[fec0::1]",
            "LOCALHOST:5001",
            "localhost.:5001",
            "a.localhost",
            "169.254.169.254.",
            "0251.0376.0251.0376",
            "0xa9fea9fe",
            "2852039166",
        ] {
            assert!(p.check_registry(no).is_err(), "{no} must be refused");
        }
        for ip in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "10.1.2.3",
            "fd00::1",
        ] {
            assert!(p.check_connection(ip.parse().unwrap()).is_err(), "{ip}");
        }
        assert!(p.check_connection("93.184.216.34".parse().unwrap()).is_ok());
        assert!(p.check_registry("registry.example.").is_ok());
    }

    #[test]
    fn a_listed_address_works_however_either_side_writes_it() {
        for listed in ["127.0.0.1:5001", "127.1:5001", "0x7f000001:05001"] {
            let p = policy(&[listed]);
            for asked in ["127.0.0.1:5001", "127.1:5001", "2130706433:5001", "0x7f.0.0.1:5001"] {
                assert!(p.check_registry(asked).is_ok(), "{listed} listed, {asked} asked");
            }
            assert!(p.check_registry("127.1:5002").is_err(), "another port");
            assert!(p.check_address("127.1:5001", "127.0.0.1".parse().unwrap()).is_ok());
            assert!(p.check_connection("127.0.0.1".parse().unwrap()).is_ok());
            assert!(p.check_connection("::ffff:127.0.0.1".parse().unwrap()).is_ok());
            assert!(p.check_connection("127.0.0.2".parse().unwrap()).is_err());
        }
        // A name listed with a port may resolve to an internal address.
        let p = policy(&["reg.lan:5000"]);
        assert!(p.check_address("reg.lan", "10.0.0.5".parse().unwrap()).is_ok());
        assert!(p.check_address("other.lan", "10.0.0.5".parse().unwrap()).is_err());
        let p = policy(&["[::1]:5001"]);
        assert!(p.check_registry("[0::1]:5001").is_ok());
        assert!(p.check_connection("::1".parse().unwrap()).is_ok());
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
