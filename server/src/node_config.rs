//! `ferry doctor --containerd-config FILE`: whether a node's containerd (kind, k3s, a host's
//! own) would send its CRI pulls to ferry, read from its config and hosts directory. The ways
//! a node bypasses a mirror without an error: no `config_path` (only the `registry.mirrors`
//! table, deprecated on containerd 2.x, where the CRI plugin then falls back to its old pull
//! path and a release that drops the table asks the origins), `registry.mirrors` beside
//! `config_path` (containerd refuses the CRI plugin's config), several directories in
//! `config_path` (read differently by containerd 2.1's transfer service, containerd#12415),
//! no `_default/hosts.toml`, and a registry's own hosts file that names no mirror.

use std::path::{Path, PathBuf};

/// One finding: `Ok(detail)`, or a problem with its fix, and whether it is fatal.
#[derive(Debug, PartialEq)]
pub enum Finding {
    Ok(String),
    Warn(String, String),
    Fail(String, String),
}

/// The CRI plugin's registry table of a config version 2 (or 1) and version 3.
const REGISTRY_TABLES: [&str; 2] = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"];

/// Judges the containerd config `text`; hosts directories are read where they are on this
/// machine (a kind node's are inside its container: say so rather than guess).
pub fn check(text: &str) -> Vec<Finding> {
    let config: toml::Table = match text.parse() {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::Fail(
                format!("not a containerd config: {e}"),
                "give the node's /etc/containerd/config.toml".into(),
            )]
        }
    };
    let plugins = config.get("plugins").and_then(|p| p.as_table());
    let registry = REGISTRY_TABLES.iter().find_map(|key| {
        plugins
            .and_then(|p| p.get(*key))
            .and_then(|c| c.get("registry"))
            .and_then(|r| r.as_table())
            .map(|r| (*key, r))
    });
    let fix_path = "set config_path = \"/etc/containerd/certs.d\" under [plugins.\"io.containerd.grpc.v1.cri\".registry] (config version 2) or [plugins.\"io.containerd.cri.v1.images\".registry] (version 3), and write its _default/hosts.toml (`ferry mirrors --for containerd`)";
    let Some((table_key, registry)) = registry else {
        return vec![Finding::Fail(
            "the CRI plugin has no registry table: containerd reads no hosts files and pulls from the origins".into(),
            fix_path.into(),
        )];
    };
    let config_path = registry
        .get("config_path")
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty());
    let mirrors = registry
        .get("mirrors")
        .and_then(|m| m.as_table())
        .filter(|m| !m.is_empty());
    let mut out = Vec::new();
    match (config_path, mirrors) {
        (None, None) => {
            out.push(Finding::Fail(
                format!("[plugins.\"{table_key}\".registry] has no config_path: containerd reads no hosts files and pulls from the origins"),
                fix_path.into(),
            ));
            return out;
        }
        (None, Some(m)) => {
            let names: Vec<&String> = m.keys().collect();
            out.push(Finding::Warn(
                format!("only the deprecated registry.mirrors table ({names:?}): containerd 2.x falls back to its old pull path for it, and a release that drops it never asks ferry"),
                fix_path.into(),
            ));
            return out;
        }
        (Some(_), Some(_)) => out.push(Finding::Fail(
            "registry.mirrors beside config_path: containerd refuses the CRI plugin's registry config when both are set".into(),
            "remove the registry.mirrors table (config_path's hosts files replace it)".into(),
        )),
        (Some(_), None) => {}
    }
    let Some(config_path) = config_path else { return out };
    let dirs: Vec<&str> = config_path.split(':').filter(|d| !d.is_empty()).collect();
    if dirs.len() > 1 {
        out.push(Finding::Warn(
            format!("config_path names {} directories ({config_path}): containerd 2.1's transfer service reads such a list differently from the CRI plugin (containerd#12415)", dirs.len()),
            "keep one directory in config_path".into(),
        ));
    }
    for dir in dirs {
        out.extend(check_hosts_dir(Path::new(dir)));
    }
    out
}

/// The hosts directory: `_default/hosts.toml` must name a mirror, and a registry's own file
/// (which wins over `_default`) must name one too.
fn check_hosts_dir(dir: &Path) -> Vec<Finding> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![Finding::Warn(
            format!(
                "cannot read {} here (inside the node's container?): its hosts files are not checked",
                dir.display()
            ),
            format!(
                "run this check where {} is, or check its _default/hosts.toml by hand",
                dir.display()
            ),
        )];
    };
    let mut out = Vec::new();
    let default = dir.join("_default/hosts.toml");
    match std::fs::read_to_string(&default) {
        Ok(text) => match mirror_hosts(&text) {
            hosts if hosts.is_empty() => out.push(Finding::Fail(
                format!(
                    "{} names no [host] to pull from: every registry is asked directly",
                    default.display()
                ),
                "write it with `ferry mirrors --for containerd`".into(),
            )),
            hosts => out.push(Finding::Ok(format!(
                "{} sends every registry to {}",
                default.display(),
                hosts.join(", ")
            ))),
        },
        Err(_) => out.push(Finding::Fail(
            format!(
                "no {}: registries without a directory of their own are asked directly",
                default.display()
            ),
            "write it with `ferry mirrors --for containerd`".into(),
        )),
    }
    let mut own: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != "_default"))
        .map(|p| p.join("hosts.toml"))
        .filter(|p| p.is_file())
        .collect();
    own.sort();
    for file in own {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if mirror_hosts(&text).is_empty() {
            out.push(Finding::Warn(
                format!(
                    "{} names no [host]: that registry's images bypass _default and ferry",
                    file.display()
                ),
                "remove it, or add ferry as a [host] with capabilities [\"pull\", \"resolve\"]".into(),
            ));
        }
    }
    out
}

/// The `[host."..."]` entries of a hosts.toml that may pull.
fn mirror_hosts(text: &str) -> Vec<String> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let Some(hosts) = table.get("host").and_then(|h| h.as_table()) else {
        return Vec::new();
    };
    hosts
        .iter()
        .filter(|(_, h)| {
            h.get("capabilities")
                .and_then(|c| c.as_array())
                .is_none_or(|c| c.iter().any(|v| v.as_str() == Some("pull")))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(f: &[Finding]) -> usize {
        f.iter().filter(|f| matches!(f, Finding::Fail(..))).count()
    }

    fn warns(f: &[Finding]) -> usize {
        f.iter().filter(|f| matches!(f, Finding::Warn(..))).count()
    }

    fn hosts_dir(default: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        if let Some(text) = default {
            std::fs::create_dir_all(d.path().join("_default")).unwrap();
            std::fs::write(d.path().join("_default/hosts.toml"), text).unwrap();
        }
        d
    }

    const FERRY: &str = "[host.\"http://10.0.0.2:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n";

    #[test]
    fn the_kind_patch_with_its_hosts_file_sends_pulls_to_ferry() {
        let d = hosts_dir(Some(FERRY));
        for table in REGISTRY_TABLES {
            let text = format!(
                "version = 2\n[plugins.\"{table}\"]\n  disable_cgroup = true\n[plugins.\"{table}\".registry]\n  config_path = \"{}\"\n",
                d.path().display()
            );
            let f = check(&text);
            assert_eq!((fails(&f), warns(&f)), (0, 0), "{f:?}");
            assert!(
                matches!(&f[0], Finding::Ok(s) if s.contains("http://10.0.0.2:5000")),
                "{f:?}"
            );
        }
    }

    #[test]
    fn each_way_a_node_bypasses_ferry_is_named() {
        // The deprecated mirrors table alone.
        let f =
            check("[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"*\"]\n  endpoint = [\"http://f:5000\"]\n");
        assert_eq!((fails(&f), warns(&f)), (0, 1), "{f:?}");
        // Nothing at all.
        assert_eq!(fails(&check("version = 2\n")), 1);
        // Both: refused by containerd.
        let d = hosts_dir(Some(FERRY));
        let both = format!(
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"http://f:5000\"]\n",
            d.path().display()
        );
        assert_eq!(fails(&check(&both)), 1);
        // Several directories.
        let two = format!(
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}:{}\"\n",
            d.path().display(),
            d.path().display()
        );
        assert!(warns(&check(&two)) >= 1);
        // No _default, or one with no host.
        for dir in [hosts_dir(None), hosts_dir(Some("server = \"https://x\"\n"))] {
            let text = format!(
                "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
                dir.path().display()
            );
            assert_eq!(fails(&check(&text)), 1, "{:?}", check(&text));
        }
        // A registry's own file without a mirror.
        std::fs::create_dir_all(d.path().join("docker.io")).unwrap();
        std::fs::write(
            d.path().join("docker.io/hosts.toml"),
            "server = \"https://registry-1.docker.io\"\n",
        )
        .unwrap();
        let text = format!(
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
            d.path().display()
        );
        let f = check(&text);
        assert_eq!((fails(&f), warns(&f)), (0, 1), "{f:?}");
        // Not a config at all.
        assert_eq!(fails(&check("[[[")), 1);
    }
}
