#!/usr/bin/env bash
# Starts the engines the end-to-end tests use and writes their addresses to $E2E_DIR/env.
# Usage: E2E_DIR=/tmp/fe2e tests/env/start.sh
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"

e2e_install_packages
e2e_install_python_packages
e2e_sweep_stale_netns
e2e_start_containerd ctd16
e2e_start_dockerd docker20 ctd16
e2e_start_containerd ctd16b
e2e_start_dockerd docker20b ctd16b
registry_port=$(e2e_free_port)
e2e_start_registry registry "$registry_port"
# Docker 26 with the containerd image store, on containerd 1.7 (Debian 13's packages).
trixie=$(e2e_fetch_trixie)
PATH="$trixie/usr/bin:$trixie/usr/sbin:$PATH" e2e_start_containerd ctd17 "$trixie/usr/bin/containerd"
echo '{"features": {"containerd-snapshotter": true}}' >"$E2E_DIR/docker26.json"
PATH="$trixie/usr/bin:$trixie/usr/sbin:$PATH" DOCKERD="$trixie/usr/sbin/dockerd" \
    e2e_start_dockerd docker26 ctd17 "$E2E_DIR/docker26.json"
# Docker 26 on its graph driver (overlay2), the default of Docker 25 to 28: its `docker save`
# writes the OCI layout too, from the graph driver's layers.
PATH="$trixie/usr/bin:$trixie/usr/sbin:$PATH" e2e_start_containerd ctd17g "$trixie/usr/bin/containerd"
PATH="$trixie/usr/bin:$trixie/usr/sbin:$PATH" DOCKERD="$trixie/usr/sbin/dockerd" \
    e2e_start_dockerd docker26g ctd17g
# Docker 28 on containerd 2.1 (Debian's unstable suite): on its containerd image store (the
# default of Docker 29 and Docker Desktop) and on overlay2, each on its own containerd.
sid=$(e2e_fetch_sid)
PATH="$sid/usr/bin:$sid/usr/sbin:$PATH" e2e_start_containerd ctd21 "$sid/usr/bin/containerd"
PATH="$sid/usr/bin:$sid/usr/sbin:$PATH" DOCKERD="$sid/usr/sbin/dockerd" \
    e2e_start_dockerd docker28 ctd21 "$E2E_DIR/docker26.json"
PATH="$sid/usr/bin:$sid/usr/sbin:$PATH" e2e_start_containerd ctd21g "$sid/usr/bin/containerd"
PATH="$sid/usr/bin:$sid/usr/sbin:$PATH" DOCKERD="$sid/usr/sbin/dockerd" \
    e2e_start_dockerd docker28g ctd21g
e2e_start_podman podman
e2e_start_podman5 podman5
e2e_start_podman_rootless podman-rootless
htpasswd -Bbc "$E2E_DIR/htpasswd" e2e-user e2e-pass >/dev/null 2>&1
auth_port=$(e2e_free_port)
e2e_start_registry registry-auth "$auth_port" "$E2E_DIR/htpasswd"
# A Docker client config with Debian unstable's buildx as its plugin, for `docker buildx build`.
mkdir -p "$E2E_DIR/docker-config/cli-plugins"
ln -sf "$sid/usr/libexec/docker/cli-plugins/docker-buildx" "$E2E_DIR/docker-config/cli-plugins/"
cat >"$E2E_DIR/env" <<ENV
export E2E_DIR=$E2E_DIR
export E2E_DOCKER20_HOST=unix://$E2E_DIR/docker20/docker.sock
export E2E_CONTAINERD16_SOCK=$E2E_DIR/ctd16/containerd.sock
export E2E_DOCKER20B_HOST=unix://$E2E_DIR/docker20b/docker.sock
export E2E_DOCKER26_HOST=unix://$E2E_DIR/docker26/docker.sock
export E2E_DOCKER26G_HOST=unix://$E2E_DIR/docker26g/docker.sock
export E2E_CONTAINERD17_SOCK=$E2E_DIR/ctd17/containerd.sock
export E2E_DOCKER28_HOST=unix://$E2E_DIR/docker28/docker.sock
export E2E_DOCKER28G_HOST=unix://$E2E_DIR/docker28g/docker.sock
export E2E_CONTAINERD21_SOCK=$E2E_DIR/ctd21/containerd.sock
export E2E_CONTAINERD21G_SOCK=$E2E_DIR/ctd21g/containerd.sock
export E2E_SID_ROOT=$sid
export E2E_DOCKER_CONFIG=$E2E_DIR/docker-config
export E2E_TRIXIE_ROOT=$trixie
export E2E_PODMAN_HOST=unix://$E2E_DIR/podman/podman.sock
export E2E_PODMAN_ROOTLESS_HOST=unix://$E2E_DIR/podman-rootless/podman.sock
export E2E_PODMAN5_HOST=unix://$E2E_DIR/podman5/podman.sock
export E2E_REGISTRY=127.0.0.1:$registry_port
export E2E_REGISTRY_AUTH=127.0.0.1:$auth_port
export E2E_REGISTRY_USER=e2e-user
export E2E_REGISTRY_PASS=e2e-pass
ENV
e2e_log "engines up: $(docker -H "unix://$E2E_DIR/docker20/docker.sock" version -f '{{.Server.Version}}') dockerd, $(ctr -a "$E2E_DIR/ctd16/containerd.sock" version | awk '/Version/{v=$2} END{print v}') containerd"
