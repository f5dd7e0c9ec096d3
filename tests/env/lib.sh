# Helpers that start real engines on private sockets and directories, for tests and benches.
# Every daemon records its PID in $E2E_DIR/pids/<name>.pid and is stopped by that PID only.
# Source this file; set E2E_DIR first (short: unix socket paths are limited to 108 bytes).

set -euo pipefail
: "${E2E_DIR:?E2E_DIR must be set}"
mkdir -p "$E2E_DIR/pids" "$E2E_DIR/logs"

e2e_log() { echo "[env] $*" >&2; }

# Installs the Debian packages the tests need, once.
e2e_install_packages() {
    local need=()
    command -v dockerd >/dev/null || need+=(docker.io)
    command -v containerd >/dev/null || need+=(containerd)
    command -v docker-registry >/dev/null || need+=(docker-registry)
    command -v skopeo >/dev/null || need+=(skopeo)
    command -v podman >/dev/null || need+=(podman)
    command -v protoc >/dev/null || need+=(protobuf-compiler)
    [ -x /bin/busybox ] || need+=(busybox-static)
    command -v htpasswd >/dev/null || need+=(apache2-utils)
    command -v curl >/dev/null || need+=(curl)
    command -v jq >/dev/null || need+=(jq)
    command -v openssl >/dev/null || need+=(openssl)
    command -v newuidmap >/dev/null || need+=(uidmap)
    command -v slirp4netns >/dev/null || need+=(slirp4netns)
    command -v ip >/dev/null || need+=(iproute2)
    command -v g++ >/dev/null || need+=(g++)   # libFuzzer, built by the fuzz targets
    # The container image's builder base, and the static arm64 binary run under emulation.
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v file >/dev/null || need+=(file)
    command -v make >/dev/null || need+=(make)   # jemalloc, in the static builds
    command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
    command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    if [ ${#need[@]} -gt 0 ]; then
        e2e_log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >"$E2E_DIR/logs/apt.log" 2>&1
        # Debian's maintainer scripts must not start the host's own daemons: a policy-rc.d
        # for the install only (unless the host has one of its own).
        local policy=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            policy=/usr/sbin/policy-rc.d
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
        fi
        local rc=0
        apt-get install -y -q "${need[@]}" >>"$E2E_DIR/logs/apt.log" 2>&1 || rc=$?
        [ -z "$policy" ] || rm -f "$policy"
        if [ "$rc" != 0 ]; then tail -30 "$E2E_DIR/logs/apt.log"; return 1; fi
    fi
}

# Python's Prometheus client, whose text parser the metrics test reads /metrics with.
e2e_install_python_packages() {
    # prometheus_client parses /metrics; schemathesis throws generated requests at the admin API.
    python3 -c 'import prometheus_client' 2>/dev/null && command -v schemathesis >/dev/null && return 0
    e2e_log "installing prometheus_client and schemathesis (PyPI)"
    python3 -m pip install -q prometheus_client 'schemathesis>=4,<5' >>"$E2E_DIR/logs/pip.log" 2>&1 ||
        python3 -m pip install -q --break-system-packages prometheus_client 'schemathesis>=4,<5' >>"$E2E_DIR/logs/pip.log" 2>&1
}

# Waits until a command succeeds, up to $2 seconds of wall time (each try is cut off after
# 5 s, as a client can hang on a socket nobody serves). When $1 names a daemon that e2e_spawn
# started and it has exited, gives up at once and shows the end of its log.
e2e_wait() {
    local what=$1 secs=$2 deadline pidfile; shift 2
    deadline=$((SECONDS + secs))
    pidfile="$E2E_DIR/pids/$what.pid"
    while [ "$SECONDS" -lt "$deadline" ]; do
        if timeout 5 "$@" >/dev/null 2>&1; then return 0; fi
        if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            e2e_log "$what exited while starting; the end of its log:"
            tail -n 20 "$E2E_DIR/logs/$what.log" >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.1
    done
    e2e_log "timed out waiting for $what"
    return 1
}

# Prints a loopback TCP port nothing listens on, below the kernel's range for outgoing
# connections' local ports: a port one of those holds cannot be listened on either, and the
# test below (a connection to it) would not see it.
e2e_free_port() {
    local p low
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range
    [ "$low" -gt 21024 ] || low=40000  # the range starts lower: no port is clear of it
    while :; do
        p=$((20000 + RANDOM % (low - 20000)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
}

# Starts a daemon in the background, records its PID under $name.
e2e_spawn() {
    local name=$1; shift
    "$@" >"$E2E_DIR/logs/$name.log" 2>&1 &
    echo $! >"$E2E_DIR/pids/$name.pid"
}

# Stops one daemon by its recorded PID (TERM, then KILL after 10 s), then the processes
# recorded as its companions (NAME+WHAT.pid: ones it started that may outlive it).
e2e_stop() {
    local f="$E2E_DIR/pids/$1.pid" pid c
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
    for c in "$E2E_DIR/pids/$1+"*.pid; do
        [ -f "$c" ] && e2e_stop "$(basename "$c" .pid)"
    done
    return 0
}

# Stops every daemon started under $E2E_DIR, newest first (companions with their owner),
# then removes the test hosts (network namespaces) made under it.
e2e_stop_all() {
    local f
    for f in $(ls -t "$E2E_DIR"/pids/*.pid 2>/dev/null); do
        case "$(basename "$f")" in *+*) continue ;; esac
        e2e_stop "$(basename "$f" .pid)"
    done
    for f in "$E2E_DIR"/netns/*; do
        [ -f "$f" ] && e2e_netns_delete "$(basename "$f")"
    done
    # Roots with mounts of their own (Podman 5's): unmounted, deepest first.
    if [ -f "$E2E_DIR/mounts" ]; then
        while read -r f; do
            umount -R "$f" 2>/dev/null || umount -R -l "$f" 2>/dev/null || true
        done <"$E2E_DIR/mounts"
        rm -f "$E2E_DIR/mounts"
    fi
    return 0
}

# Stops everything (e2e_stop_all), then removes directory $1 when given (a bench's own
# $E2E_DIR: a gigabyte or more of engine data per run). Mounts left under it are unmounted
# first and rm stays on the directory's file system: nothing outside it is touched. With
# mounts that will not go, the directory stays and says so.
e2e_cleanup() { # [dir]
    local m
    e2e_stop_all
    [ -n "${1:-}" ] && [ -d "$1" ] || return 0
    for m in $(findmnt -rn -o TARGET | grep "^$1/" | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    if findmnt -rn -o TARGET | grep -q "^$1/"; then
        echo "[env] mounts left under $1: not removed" >&2
        return 0
    fi
    rm -rf --one-file-system "$1"
}

# Docker 26.1 and containerd 1.7 from Debian 13's packages, unpacked (not installed) under
# $E2E_DIR/trixie/root; their binaries run on Debian 12. Prints the unpacked root.
e2e_fetch_trixie() {
    e2e_fetch_suite trixie docker.io containerd
}

# Docker 28 (docker.io, docker-cli) and containerd 2.1 from Debian's unstable suite, unpacked
# under $E2E_DIR/sid/root. Their runc needs a newer glibc than Debian 12's: it is removed, so
# Debian 12's runc is found on PATH.
e2e_fetch_sid() {
    e2e_fetch_suite sid docker.io docker-cli containerd docker-buildx && rm -f "$E2E_DIR/sid/root/usr/sbin/runc" "$E2E_DIR/sid/root/usr/bin/runc"
}

# Downloads (without installing) packages $2.. of Debian suite $1 and unpacks them under
# $E2E_DIR/$1/root; prints that root.
e2e_fetch_suite() {
    local suite=$1 t="$E2E_DIR/$1" uri o
    shift
    if [ ! -x "$t/root/usr/sbin/dockerd" ]; then
        mkdir -p "$t/lists/partial" "$t/debs" "$t/root" "$E2E_DIR/logs"
        uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
        echo "deb $uri $suite main" >"$t/sources.list"
        o="-o Dir::Etc::sourcelist=$t/sources.list -o Dir::Etc::sourceparts=- -o Dir::State::Lists=$t/lists"
        apt-get $o update -q >"$E2E_DIR/logs/$suite.log" 2>&1
        (cd "$t/debs" && apt-get $o download "$@" >>"$E2E_DIR/logs/$suite.log" 2>&1)
        for f in "$t"/debs/*.deb; do dpkg -x "$f" "$t/root"; done
        if [ ! -x "$t/root/usr/sbin/dockerd" ]; then
            e2e_log "could not fetch Debian $suite's $*; see $E2E_DIR/logs/$suite.log"
            return 1
        fi
    fi
    echo "$t/root"
}

# containerd with its own root, state and socket: $E2E_DIR/<name>/containerd.sock
# Optional $2: the containerd binary.
e2e_start_containerd() {
    local name=$1 bin=${2:-containerd} d="$E2E_DIR/$1"
    mkdir -p "$d"
    cat >"$d/config.toml" <<TOML
version = 2
root = "$d/root"
state = "$d/state"
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
[debug]
  address = "$d/debug.sock"
[plugins."io.containerd.grpc.v1.cri"]
  disable_cgroup = true
TOML
    # $CONTAINERD_PATCH: TOML appended to the config, as kind merges containerdConfigPatches.
    [ -z "${CONTAINERD_PATCH:-}" ] || printf '%s\n' "$CONTAINERD_PATCH" >>"$d/config.toml"
    e2e_spawn "$name" "$bin" --config "$d/config.toml"
    e2e_wait "$name" 30 ctr -a "$d/containerd.sock" version
}

# dockerd on a private socket, using the containerd started as "$2".
# Optional $3: a daemon.json to use; $DOCKERD_ARGS: more flags (e.g. a TLS tcp listener).
# The socket is $E2E_DIR/<name>/docker.sock.
e2e_start_dockerd() {
    local name=$1 ctd=$2 config=${3:-} d="$E2E_DIR/$1"
    mkdir -p "$d/root" "$d/exec"
    [ -n "$config" ] || { config="$d/daemon.json"; echo '{}' >"$config"; }
    e2e_spawn "$name" "${DOCKERD:-dockerd}" --config-file "$config" \
        --containerd "$E2E_DIR/$ctd/containerd.sock" \
        --data-root "$d/root" --exec-root "$d/exec" -H "unix://$d/docker.sock" \
        --pidfile "$d/docker.pid" --bridge none --iptables=false --ip-masq=false ${DOCKERD_ARGS:-}
    e2e_wait "$name" 60 docker -H "unix://$d/docker.sock" info
}

# distribution (Debian's docker-registry) on $4:$2 (default 127.0.0.1), optionally with
# htpasswd file $3, and with TLS when $5 is a directory holding ca.pem, server-cert.pem and
# server-key.pem (see make_server_cert in the tests).
e2e_start_registry() { # name port [htpasswd] [listen-ip] [tls-dir] [test host] [auth yaml]
    local name=$1 port=$2 htpasswd=${3:-} ip=${4:-127.0.0.1} tls=${5:-} host=${6:-} auth=${7:-} d="$E2E_DIR/$1" url curl_tls=() run=()
    mkdir -p "$d/data"
    {
        echo "version: 0.1"
        echo "log: {level: warn}"
        echo "storage: {filesystem: {rootdirectory: $d/data}, delete: {enabled: true}}"
        if [ -n "$tls" ]; then
            echo "http: {addr: \"$ip:$port\", tls: {certificate: $tls/server-cert.pem, key: $tls/server-key.pem}}"
        else
            echo "http: {addr: \"$ip:$port\"}"
        fi
        if [ -n "$auth" ]; then
            echo "auth: $auth"
        elif [ -n "$htpasswd" ]; then
            echo "auth: {htpasswd: {realm: e2e, path: $htpasswd}}"
        fi
    } >"$d/config.yml"
    url="http://$ip:$port/v2/"
    [ -z "$tls" ] || { url="https://$ip:$port/v2/"; curl_tls=(--cacert "$tls/ca.pem"); }
    # `ip netns exec` execs the registry, so the recorded PID is the registry's own.
    [ -z "$host" ] || run=(ip netns exec "fe2e-$host")
    e2e_spawn "$name" "${run[@]}" docker-registry serve "$d/config.yml"
    e2e_wait "$name" 30 bash -c "curl -s ${curl_tls[*]} -o /dev/null -w '%{http_code}' $url | grep -qE '200|401'"
}

# Makes, in DIR, a CA (ca.pem, ca-key.pem) and a server certificate for the address IP signed
# by it (server-cert.pem, server-key.pem): what e2e_start_registry's tls-dir holds.
e2e_make_server_cert() { # dir ip
    local d=$1 ip=$2
    mkdir -p "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/ca-key.pem" -out "$d/ca.pem" -days 1 \
        -subj /CN=e2e-ca >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -keyout "$d/server-key.pem" -out "$d/server.csr" \
        -subj "/CN=$ip" >/dev/null 2>&1
    printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth\n' "$ip" >"$d/server.ext"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca-key.pem" -CAcreateserial \
        -out "$d/server-cert.pem" -days 1 -extfile "$d/server.ext" >/dev/null 2>&1
}

# A token service for distribution's auth.token (tests/env/token_server.py) on ip:port,
# with a fresh self-signed signing certificate in $E2E_DIR/NAME (cert.pem, key.pem); grants
# pull to USER:PASSWORD. Prints the auth YAML for e2e_start_registry's last argument.
e2e_start_token_server() { # name ip port user password
    local name=$1 ip=$2 port=$3 user=$4 password=$5 d="$E2E_DIR/$1"
    mkdir -p "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/key.pem" -out "$d/cert.pem" -days 1 \
        -subj "/CN=$name" >/dev/null 2>&1
    e2e_spawn "$name" python3 "$(dirname "${BASH_SOURCE[0]}")/token_server.py" "$ip" "$port" "$name" \
        "$user" "$password" "$d/key.pem" "$d/cert.pem"
    e2e_wait "$name" 30 bash -c "curl -s -o /dev/null -w '%{http_code}' http://$ip:$port/token | grep -q 401"
    echo "{token: {realm: \"http://$ip:$port/token\", service: $name, issuer: $name, rootcertbundle: $d/cert.pem}}"
}

# Test hosts: a network namespace joined to this one by a veth pair, on a private /30 from
# 10.213.0.0/16 that no address or route of this machine overlaps, for origins that must not
# look like loopback. Each is recorded in $E2E_DIR/netns/<name> so that e2e_stop_all removes
# it even after a test that died. Prints "HOST_SIDE_IP NAMESPACE_IP".
e2e_netns_create() { # name
    local name=$1 ns="fe2e-$1" n a b try used veth
    mkdir -p "$E2E_DIR/netns"
    for try in $(seq 1 100); do
        n=$((RANDOM % 16384)); a=$((n / 64)); b=$(((n % 64) * 4))
        used=$( { ip -4 -o addr show; ip -4 route show; ip netns list; } 2>/dev/null)
        # A /24 of ours that nothing here mentions, and veth names nobody holds.
        if ! grep -q "10\.213\.$a\." <<<"$used" && ! ip link show "fv${n}h" >/dev/null 2>&1; then
            break
        fi
        [ "$try" != 100 ] || { e2e_log "no free 10.213.x.y/30 for a test host"; return 1; }
    done
    veth="fv${n}h"
    echo "$ns $veth" >"$E2E_DIR/netns/$name"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name "fv${n}n"
    ip link set "fv${n}n" netns "$ns"
    ip addr add "10.213.$a.$((b + 1))/30" dev "$veth"
    ip link set "$veth" up
    ip -n "$ns" addr add "10.213.$a.$((b + 2))/30" dev "fv${n}n"
    ip -n "$ns" link set "fv${n}n" up
    ip -n "$ns" link set lo up
    echo "10.213.$a.$((b + 1)) 10.213.$a.$((b + 2))"
}

# Removes the test hosts of runs that were killed before they could (the run's PID, in its
# directory's name, is gone).
e2e_sweep_stale_netns() {
    local f run pid
    for f in /tmp/fe2e-*/netns/*; do
        [ -f "$f" ] || continue
        run=$(dirname "$(dirname "$f")"); pid=${run##*/fe2e-}
        case "$pid" in *[!0-9]* | '') continue ;; esac
        kill -0 "$pid" 2>/dev/null && continue
        E2E_DIR=$run e2e_netns_delete "$(basename "$f")"
    done
}

# Removes a test host: its namespace and its veth pair.
e2e_netns_delete() { # name
    local f="$E2E_DIR/netns/$1" ns veth
    [ -f "$f" ] || return 0
    read -r ns veth <"$f"
    ip netns del "$ns" 2>/dev/null || true
    ip link del "$veth" 2>/dev/null || true
    rm -f "$f"
}

# Rootful Podman's Docker-compatible API on $E2E_DIR/<name>/podman.sock, with its own storage.
e2e_start_podman() {
    local name=$1 d="$E2E_DIR/$1"
    mkdir -p "$d/root" "$d/runroot"
    cat >"$d/storage.conf" <<TOML
[storage]
driver = "vfs"
graphroot = "$d/root"
runroot = "$d/runroot"
TOML
    # From its own directory: Podman 4.3's API service reads a remote build's Dockerfile from
    # its working directory when one is there (the repository's, had it started from there).
    (cd "$d" && CONTAINERS_STORAGE_CONF="$d/storage.conf" e2e_spawn "$name" \
        podman --root "$d/root" --runroot "$d/runroot" --storage-driver vfs \
        system service --time=0 "unix://$d/podman.sock")
    e2e_wait "$name" 30 curl -sf --unix-socket "$d/podman.sock" http://d/v1.41/version
}

# Podman 5 (Debian 13's; it needs a newer glibc than Debian 12 has) as an API service run
# inside a Debian 13 root made with debootstrap under $E2E_DIR/<name>-root. Its socket and
# its storage are in $E2E_DIR/<name>, bind-mounted at the same path inside the root, so
# ferry reads the storage at the path the engine reports. The root is itself a mount point
# (containers/storage remounts / when it applies a layer). The mounts are listed in
# $E2E_DIR/mounts for e2e_stop_all.
e2e_start_podman5() {
    local name=$1 d="$E2E_DIR/$1" r="$E2E_DIR/$1-root" uri
    mkdir -p "$d" "$E2E_DIR/logs"
    command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
    if [ ! -x "$r/usr/bin/podman" ]; then
        uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
        debootstrap --variant=minbase trixie "$r" "$uri" >"$E2E_DIR/logs/$name-debootstrap.log" 2>&1
        cp /etc/resolv.conf "$r/etc/resolv.conf"
        chroot "$r" bash -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends podman' \
            >>"$E2E_DIR/logs/$name-debootstrap.log" 2>&1
    fi
    mkdir -p "$r$d"
    mount --bind "$r" "$r" && mount --make-private "$r"
    mount -t proc proc "$r/proc"
    mount --bind /dev "$r/dev"
    mount --bind /sys "$r/sys"
    mount --bind "$d" "$r$d"
    echo "$r" >>"$E2E_DIR/mounts"
    # From its own directory, as e2e_start_podman says.
    (cd "$d" && PODMAN_IGNORE_CGROUPSV1_WARNING=1 e2e_spawn "$name" chroot "$r" podman --root "$d/root" --runroot "$d/runroot" \
        --storage-driver vfs --cgroup-manager cgroupfs --events-backend file \
        system service --time=0 "unix://$d/podman.sock")
    e2e_wait "$name" 30 curl -sf --unix-socket "$d/podman.sock" http://d/v1.41/version
}

# A Rust builder image for the Dockerfile's RUST_IMAGE, made here because no base image can be
# pulled: a Debian 12 root from debootstrap (gcc, git), this machine's CA bundle and rustup
# and its default toolchain (without documentation) at the official Rust image's
# paths, imported into the engine at DOCKER_HOST as TAG. The root is kept under $E2E_DIR.
e2e_rust_builder_image() { # tag
    local tag=$1 r="$E2E_DIR/rust-root" log="$E2E_DIR/logs/rust-root.log" uri tc
    command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
    if [ ! -x "$r/usr/local/cargo/bin/rustup" ]; then
        rm -rf "$r"
        uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
        debootstrap --variant=minbase --include=gcc,libc6-dev,git,ca-certificates \
            bookworm "$r" "$uri" >"$log" 2>&1
        rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*
        cp /etc/resolv.conf "$r/etc/resolv.conf"
        # This machine's trust store: where TLS to the crate registry goes through a proxy
        # with an authority of its own, the builder must trust it as the host does.
        cp /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/ca-certificates.crt"
        # The toolchain as rustup installed it (its manifests, so `rustup target add` works),
        # without its documentation.
        tc=$(rustc --print sysroot)
        mkdir -p "$r/usr/local/cargo/bin" "$r/usr/local/rustup/toolchains/${tc##*/}"
        cp -a "$tc/bin" "$tc/lib" "$tc/libexec" "$tc/etc" "$r/usr/local/rustup/toolchains/${tc##*/}/"
        cp "$(command -v rustup)" "$r/usr/local/cargo/bin/rustup"
        for t in cargo rustc rustdoc; do ln -sf rustup "$r/usr/local/cargo/bin/$t"; done
        printf 'version = "12"\ndefault_toolchain = "%s"\nauto_self_update = "disable"\nprofile = "minimal"\n' \
            "${tc##*/}" >"$r/usr/local/rustup/settings.toml"
    fi
    tar -C "$r" -c . | docker import \
        -c 'ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo' \
        -c 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$tag" >/dev/null
}

# Uploads FILE as a blob of REPO to the registry at HOST:PORT (POST, then PUT with the
# digest, as distribution takes it); prints the digest.
e2e_upload_blob() { # host:port repo file [user:password]
    local digest loc auth=()
    [ -z "${4:-}" ] || auth=(-u "$4")
    digest="sha256:$(sha256sum "$3" | cut -d' ' -f1)"
    loc=$(curl -sf "${auth[@]}" -X POST -D - -o /dev/null "http://$1/v2/$2/blobs/uploads/" | awk -F': ' 'tolower($1)=="location"{print $2}' | tr -d '\r')
    case "$loc" in http*) ;; *) loc="http://$1$loc" ;; esac
    case "$loc" in *\?*) loc="$loc&digest=$digest" ;; *) loc="$loc?digest=$digest" ;; esac
    curl -sf "${auth[@]}" -X PUT -H 'Content-Type: application/octet-stream' -T "$3" "$loc" -o /dev/null
    echo "$digest"
}

# Rootless Podman: the API service runs as an unprivileged user (created if needed, with a
# subuid range) on $E2E_DIR/<name>/podman.sock. setpriv execs, so the recorded PID is podman's.
e2e_start_podman_rootless() {
    local name=$1 user=ferry-e2e d="$E2E_DIR/$1" uid gid run
    id "$user" >/dev/null 2>&1 || useradd -m "$user"
    grep -q "^$user:" /etc/subuid || usermod --add-subuids 300000-365535 --add-subgids 300000-365535 "$user"
    uid=$(id -u "$user"); gid=$(id -g "$user")
    run="/run/user/$uid"
    mkdir -p "$run" "$d" && chown "$user:" "$run" "$d" && chmod 700 "$run"
    # The socket directory must be reachable by root (ferry) and writable by the user.
    chmod 755 "$E2E_DIR" "$d"
    # From its own directory, as e2e_start_podman says.
    (cd "$d" && e2e_spawn "$name" setpriv --reuid="$uid" --regid="$gid" --init-groups \
        env HOME="$(getent passwd "$user" | cut -d: -f6)" USER="$user" XDG_RUNTIME_DIR="$run" \
        podman --storage-driver vfs system service --time=0 "unix://$d/podman.sock")
    e2e_wait "$name" 60 curl -sf --unix-socket "$d/podman.sock" http://d/v1.41/version
    # The recorded podman re-executes itself inside a user namespace and waits for that child,
    # which outlives it when the parent has to be killed; and Podman keeps a pause process
    # that holds the namespace (it records its PID). Both are stopped after the parent.
    local child
    # (No child when the user's namespace already exists: podman then joins it.)
    child=$({ ps -o pid= --ppid "$(cat "$E2E_DIR/pids/$name.pid")" || true; } | head -1 | tr -d ' ')
    if [ -n "$child" ]; then echo "$child" >"$E2E_DIR/pids/$name+userns.pid"; fi
    if [ -s "$run/libpod/tmp/pause.pid" ]; then
        cp "$run/libpod/tmp/pause.pid" "$E2E_DIR/pids/$name+pause.pid"
    fi
}

# Builds a runnable test image FROM scratch with busybox plus generated files, one layer per
# extra file. --no-cache: tests build in parallel and remove their images, and a cached
# parent removed by another test would break the build. With BASE, the image is built FROM
# that image (sharing its layers) instead of scratch + busybox.
# Usage: e2e_build_image DOCKER_HOST TAG LAYERS [BASE]
e2e_build_image() {
    local host=$1 tag=$2 layers=$3 base=${4:-} seed=$2 ctx
    ctx=$(mktemp -d "$E2E_DIR/build.XXXXXX")
    cp /bin/busybox "$ctx/busybox"
    {
        if [ -n "$base" ]; then
            echo "FROM $base"
        else
            echo "FROM scratch"
            echo "COPY busybox /bin/busybox"
        fi
        for i in $(seq 1 "$layers"); do
            echo "$seed layer $i $(date +%s%N)" >"$ctx/file$i"
            echo "COPY file$i /data/file$i"
        done
        echo "CMD [\"/bin/busybox\", \"echo\", \"hello from $tag\"]"
    } >"$ctx/Dockerfile"
    DOCKER_BUILDKIT=0 docker -H "$host" build --no-cache -q -t "$tag" "$ctx" >/dev/null
    rm -rf "$ctx"
}
