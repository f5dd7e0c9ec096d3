//! Turns a `/v2/...` path into the API operation it names. Names may contain `/`, so the path
//! is parsed from its end: the last `/manifests/`, `/blobs/`, ... marker splits name from
//! operation.

/// What a `/v2/` path addresses (the HTTP method picks the action).
#[derive(Debug, PartialEq, Eq)]
pub enum Resource<'a> {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags { name: &'a str },
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: &'a str, reference: String },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: &'a str, digest: String },
    /// `/v2/<name>/blobs/uploads/` (no id: start an upload)
    Uploads { name: &'a str },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: &'a str, id: &'a str },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: &'a str, digest: String },
}

/// Parses the path of a request (without query). `None` means no API route matches.
pub fn parse(path: &str) -> Option<Resource<'_>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Resource::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Resource::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Resource::Tags { name });
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Some(Resource::Uploads { name });
    }
    if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/") {
        if !id.contains('/') {
            return Some(Resource::Upload { name, id });
        }
    }
    let (name, op, last) = {
        let (head, last) = rest.rsplit_once('/')?;
        let (name, op) = head.rsplit_once('/')?;
        (name, op, last)
    };
    // Some clients percent-encode the `:` of a digest.
    let last = last.replace("%3A", ":").replace("%3a", ":");
    match op {
        "manifests" => Some(Resource::Manifest { name, reference: last }),
        "blobs" => Some(Resource::Blob { name, digest: last }),
        "referrers" => Some(Resource::Referrers { name, digest: last }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_route() {
        assert_eq!(parse("/v2/"), Some(Resource::Base));
        assert_eq!(parse("/v2"), Some(Resource::Base));
        assert_eq!(parse("/v2/_catalog"), Some(Resource::Catalog));
        assert_eq!(parse("/v2/a/b/tags/list"), Some(Resource::Tags { name: "a/b" }));
        assert_eq!(
            parse("/v2/a/manifests/x/manifests/latest"),
            Some(Resource::Manifest {
                name: "a/manifests/x",
                reference: "latest".into()
            })
        );
        assert_eq!(
            parse("/v2/a/blobs/sha256%3Aab"),
            Some(Resource::Blob {
                name: "a",
                digest: "sha256:ab".into()
            })
        );
        assert_eq!(parse("/v2/a/b/blobs/uploads/"), Some(Resource::Uploads { name: "a/b" }));
        assert_eq!(
            parse("/v2/a/blobs/uploads/123"),
            Some(Resource::Upload { name: "a", id: "123" })
        );
        assert_eq!(
            parse("/v2/registry.k8s.io/pause/referrers/sha256:1"),
            Some(Resource::Referrers {
                name: "registry.k8s.io/pause",
                digest: "sha256:1".into()
            })
        );
        assert_eq!(parse("/v2/a/other/x"), None);
        assert_eq!(parse("/v3/"), None);
        assert_eq!(parse("/v2x"), None);
    }
}
