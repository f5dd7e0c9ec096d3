//! Leaving root. `k3d registry create` starts a registry container as its image's user and
//! offers no `--group-add`, so ferry's image starts as root and ferry itself becomes
//! `server.drop_to` (`FERRY_DROP_TO=UID:GID`), keeping as supplementary groups only the groups of the engine
//! sockets it is configured for: what the engine's socket grants, no more.

use std::os::unix::fs::MetadataExt;

use nix::unistd::{Gid, Uid};

use ferry_server::config::Config;

/// Drops to `server.drop_to` when it is set and this process is root. Stays root (and says
/// why) when a configured socket would not be usable by that user through its group.
pub fn drop_if_asked(config: &Config) -> Result<(), String> {
    let spec = config.server.drop_to.as_deref().unwrap_or("").trim();
    if spec.is_empty() || !Uid::effective().is_root() {
        return Ok(());
    }
    let (uid, gid) = spec
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
        .ok_or_else(|| format!("server.drop_to (FERRY_DROP_TO) {spec:?}: expected UID:GID, e.g. 65532:65532"))?;
    let mut groups = vec![Gid::from_raw(gid)];
    for b in &config.backends {
        let Some(socket) = b.unix_socket() else { continue };
        let Ok(meta) = std::fs::metadata(&socket) else {
            continue; // not there (yet): the backend reports it
        };
        let group_rw = meta.mode() & 0o060 == 0o060;
        if meta.uid() != uid && !group_rw {
            tracing::warn!(socket = %socket.display(), mode = format!("{:o}", meta.mode() & 0o777),
                "staying root: this socket is open to its owner only, so uid {uid} could not use it");
            return Ok(());
        }
        if !groups.contains(&Gid::from_raw(meta.gid())) {
            groups.push(Gid::from_raw(meta.gid()));
        }
    }
    nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setgid(Gid::from_raw(gid)).map_err(|e| format!("setgid({gid}): {e}"))?;
    nix::unistd::setuid(Uid::from_raw(uid)).map_err(|e| format!("setuid({uid}): {e}"))?;
    tracing::info!(uid, gid, groups = ?groups.iter().map(|g| g.as_raw()).collect::<Vec<_>>(),
        "dropped root: running as server.drop_to with the engine sockets' groups");
    Ok(())
}
