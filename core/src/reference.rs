//! Image references as a registry request names them, and the one place where Docker Hub's
//! naming quirks (`docker.io`, `library/`) are normalised.
//!
//! A request reaches ferry as `/v2/<name>/...`, optionally with `?ns=<registry>` (containerd
//! mirrors send it). Without `ns`, a first path component that looks like a host
//! (`registry.k8s.io/pause`) names the origin registry, so Docker and skopeo can reach any
//! registry's images too; otherwise the origin is Docker Hub.

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Docker Hub, in the form containerd and Docker use for it in image names.
pub const DOCKER_HUB: &str = "docker.io";
/// The longest repository name the distribution spec allows.
pub const MAX_NAME_LEN: usize = 255;

/// A repository at an origin registry, e.g. `docker.io` + `library/alpine`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository {
    registry: String,
    path: String,
}

impl Repository {
    /// Parses the `<name>` of a `/v2/<name>/...` request and its optional `ns` query value.
    ///
    /// Fails with [`Error::NameInvalid`] when the name breaks the spec grammar, is longer than
    /// 255 characters, or `ns` is not a host name.
    pub fn from_request(name: &str, ns: Option<&str>) -> Result<Self> {
        if name.len() > MAX_NAME_LEN {
            return Err(Error::NameInvalid(format!(
                "name is {} characters long, at most {MAX_NAME_LEN} are allowed",
                name.len()
            )));
        }
        let (registry, path) = match ns {
            Some(ns) => (normalize_registry(ns)?, name),
            None => match name.split_once('/') {
                Some((first, rest)) if is_host_component(first) => (normalize_registry(first)?, rest),
                _ => (DOCKER_HUB.to_string(), name),
            },
        };
        Repository::new(&registry, path)
    }

    /// Builds a repository from an already separated registry and path, validating both and
    /// adding Docker Hub's `library/` to single-component Hub names.
    pub fn new(registry: &str, path: &str) -> Result<Self> {
        let registry = normalize_registry(registry)?;
        validate_path(path)?;
        let path = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        Ok(Repository { registry, path })
    }

    /// The origin registry host, `docker.io` for Docker Hub.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path at its registry (`library/alpine`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The fully qualified name as containerd stores it: `docker.io/library/alpine`.
    pub fn canonical(&self) -> String {
        format!("{}/{}", self.registry, self.path)
    }

    /// The short name Docker shows and `docker save` accepts: `alpine` for Hub's library
    /// images, `user/app` for other Hub images, `registry.k8s.io/pause` elsewhere.
    pub fn familiar(&self) -> String {
        if self.registry != DOCKER_HUB || self.hub_path_looks_like_a_host() {
            return self.canonical();
        }
        // As Docker does: `library/` goes only from a one-component name.
        match self.path.strip_prefix("library/") {
            Some(short) if !short.contains('/') => short.to_string(),
            _ => self.path.clone(),
        }
    }

    /// A Hub path whose first component reads as a host (`foo.com/bar`): in a short form it
    /// would name another registry, so it keeps `docker.io/` in front.
    fn hub_path_looks_like_a_host(&self) -> bool {
        self.path
            .split_once('/')
            .is_some_and(|(first, _)| is_host_component(first))
    }

    /// The name to put in a `/v2/<name>/` path so that a client without `ns` reaches this
    /// repository again: the Hub path as is, other registries prefixed by their host.
    pub fn request_name(&self) -> String {
        if self.registry == DOCKER_HUB && !self.hub_path_looks_like_a_host() {
            self.path.clone()
        } else {
            self.canonical()
        }
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.path)
    }
}

impl fmt::Debug for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a manifest request names inside a repository.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A tag, e.g. `v1`.
    Tag(String),
    /// A digest, `sha256:…`.
    Digest(Digest),
}

impl Reference {
    /// Parses the last path segment of a manifest request: a digest when it has a `:`,
    /// else a tag.
    pub fn parse(s: &str) -> Result<Self> {
        if Digest::looks_like(s) {
            Ok(Reference::Digest(s.parse()?))
        } else {
            validate_tag(s)?;
            Ok(Reference::Tag(s.to_string()))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => fmt::Display::fmt(d, f),
        }
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A repository plus tag or digest: one image as a client asks for it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Where the image lives.
    pub repository: Repository,
    /// Which manifest: tag or digest.
    pub reference: Reference,
}

impl ImageRef {
    /// An image reference from its parts.
    pub fn new(repository: Repository, reference: Reference) -> Self {
        ImageRef { repository, reference }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repository),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repository),
        }
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Checks a tag against `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<()> {
    let mut bytes = tag.bytes();
    let first_ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if first_ok && rest_ok && tag.len() <= 128 {
        Ok(())
    } else {
        Err(Error::TagInvalid(format!(
            "{tag:?} does not match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}"
        )))
    }
}

/// Checks a repository path: components `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`.
fn validate_path(path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(Error::NameInvalid("empty repository name".into()));
    }
    for component in path.split('/') {
        if !valid_component(component) {
            return Err(Error::NameInvalid(format!(
                "{path:?}: component {component:?} does not match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*"
            )));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        // An alphanumeric run.
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // A separator: ".", "_", "__" or one or more "-".
        match b[i] {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// A path component names a host when it has a dot or a port, or is `localhost` — the rule
/// Docker applies to image names.
fn is_host_component(s: &str) -> bool {
    s.contains('.') || s.contains(':') || s == "localhost"
}

/// Checks a registry host is `host[:port]` (IPv6 in brackets), puts it in its canonical form
/// — the form the origin policy judges, the cache keys on and the HTTP client connects to
/// ([`crate::origin::canonical_registry`]) — and folds Docker Hub's aliases into `docker.io`.
fn normalize_registry(host: &str) -> Result<String> {
    let host = host.to_ascii_lowercase();
    let host = host.as_str();
    let invalid = || Error::NameInvalid(format!("{host:?} is not a registry host"));
    if host.starts_with('[') {
        if !host
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b'[' | b']' | b':' | b'.'))
        {
            return Err(invalid());
        }
    } else {
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            && !name.starts_with(['.', '-'])
            && !name.contains("..");
        let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit()));
        if !name_ok || !port_ok {
            return Err(invalid());
        }
    }
    // A name without a dot or a port is a Docker Hub namespace to every client (`myreg/app`
    // is docker.io/myreg/app): as a registry it would have no name clients could write, and
    // ferry could take the engine's Docker Hub image for it.
    if !is_host_component(host) {
        return Err(Error::NameInvalid(format!(
            "{host:?} is not a registry host: without a dot or a port it names a Docker Hub namespace"
        )));
    }
    let host = crate::origin::canonical_registry(host).map_err(Error::NameInvalid)?;
    Ok(match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB.into(),
        _ => host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(name: &str, ns: Option<&str>) -> Result<Repository> {
        Repository::from_request(name, ns)
    }

    #[test]
    fn hub_names_get_library_prefix() {
        let r = repo("alpine", None).unwrap();
        assert_eq!(r.canonical(), "docker.io/library/alpine");
        assert_eq!(r.familiar(), "alpine");
        assert_eq!(r.request_name(), "library/alpine");
        let r = repo("library/alpine", Some("docker.io")).unwrap();
        assert_eq!(r.familiar(), "alpine");
        let r = repo("user/app", Some("index.docker.io")).unwrap();
        assert_eq!(r.canonical(), "docker.io/user/app");
        assert_eq!(r.familiar(), "user/app");
    }

    #[test]
    fn a_registry_needs_a_dot_or_a_port_and_every_name_reads_back() {
        // Found by fuzzing: `ns=0` made a repository whose canonical form parsed as Docker
        // Hub's `0/ocrr`.
        assert!(repo("ocrr", Some("0")).is_err());
        assert!(repo("app", Some("myreg")).is_err());
        // And a Hub path whose first component reads as a host keeps `docker.io/` (found by
        // fuzzing too: `library/a.b.io/c` came back as registry a.b.io).
        assert_eq!(repo("library/a.b.io/c", None).unwrap().familiar(), "library/a.b.io/c");
        assert_eq!(
            repo("a.b.io/c", Some("docker.io")).unwrap().familiar(),
            "docker.io/a.b.io/c"
        );
        assert_eq!(
            repo("a.b.io/c", Some("docker.io")).unwrap().request_name(),
            "docker.io/a.b.io/c"
        );
        assert_eq!(repo("library/x/y", None).unwrap().familiar(), "library/x/y");
        for (name, ns) in [
            ("app", Some("myreg:5000")),
            ("app", Some("localhost")),
            ("a/b", Some("r.io")),
            ("library/a.b.io/c", None),
            ("a.b.io/c", Some("docker.io")),
            ("library/x/y", None),
        ] {
            let r = repo(name, ns).unwrap();
            assert_eq!(repo(&r.canonical(), None).unwrap(), r);
            assert_eq!(repo(&r.familiar(), None).unwrap(), r);
        }
    }

    #[test]
    fn origin_from_ns_or_path() {
        let r = repo("pause", Some("registry.k8s.io")).unwrap();
        assert_eq!(r.canonical(), "registry.k8s.io/pause");
        assert_eq!(r.familiar(), "registry.k8s.io/pause");
        let r = repo("registry.k8s.io/pause", None).unwrap();
        assert_eq!(r.registry(), "registry.k8s.io");
        assert_eq!(r.path(), "pause");
        assert_eq!(r.request_name(), "registry.k8s.io/pause");
        let r = repo("localhost/x/y", None).unwrap();
        assert_eq!(r.registry(), "localhost");
        let r = repo("127.0.0.1:5000/x", None).unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        // A single component with a dot is a name, not a host.
        let r = repo("my.app", None).unwrap();
        assert_eq!(r.canonical(), "docker.io/library/my.app");
    }

    #[test]
    fn every_spelling_of_a_host_is_one_registry() {
        for (ns, want) in [
            ("127.1:5001", "127.0.0.1:5001"),
            ("0x7f.0.0.1:5001", "127.0.0.1:5001"),
            ("0X7F000001:5001", "127.0.0.1:5001"),
            ("2130706433:5001", "127.0.0.1:5001"),
            ("0177.0.0.1:5001", "127.0.0.1:5001"),
            ("127.000.000.001:05001", "127.0.0.1:5001"),
            ("127.0.0.1.:5001", "127.0.0.1:5001"),
            ("0:5001", "0.0.0.0:5001"),
            ("[::FFFF:7f00:1]:5001", "[::ffff:127.0.0.1]:5001"),
            ("[0:0:0:0:0:0:0:1]", "[::1]"),
            ("LocalHost.:5001", "localhost:5001"),
            ("Registry.K8S.io.", "registry.k8s.io"),
            ("index.docker.io.", "docker.io"),
        ] {
            assert_eq!(repo("x/y", Some(ns)).unwrap().registry(), want, "?ns={ns}");
            assert_eq!(repo(&format!("{ns}/x/y"), None).unwrap().registry(), want, "{ns}/x/y");
        }
        for bad in ["127.0.0.1.5:5001", "foo.1", "[::1", "[::1]x", "[zz::1]", "a.b:99999"] {
            assert!(repo("x", Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        let long = "a".repeat(300);
        for bad in [
            "Upper",
            "a/../b",
            "..",
            "%2e%2e/x",
            "a//b",
            "-a",
            "a-",
            "a__-b",
            "a___b",
            "",
            "a/",
            "/a",
            long.as_str(),
        ] {
            assert!(matches!(repo(bad, None), Err(Error::NameInvalid(_))), "{bad:?}");
        }
        assert!(repo("a", Some("bad host!")).is_err());
        for good in ["a", "a-b", "a--b", "a__b", "a_b.c", "a0/b1/c2", "x/y-z.w"] {
            assert!(repo(good, None).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn references() {
        assert_eq!(Reference::parse("v1.0").unwrap(), Reference::Tag("v1.0".into()));
        assert!(matches!(Reference::parse(".bad"), Err(Error::TagInvalid(_))));
        assert!(matches!(Reference::parse(&"a".repeat(129)), Err(Error::TagInvalid(_))));
        assert!(Reference::parse(&"a".repeat(128)).is_ok());
        assert!(matches!(Reference::parse("sha256:00"), Err(Error::DigestInvalid(_))));
    }
}
