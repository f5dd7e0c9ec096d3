#!/usr/bin/env bash
# Builds ferry's container image with no base image: the release binary, the shared C
# libraries it links (from this Debian 12 machine, ldd's list), passwd/group entries for
# uid 65532, and container.toml as /etc/ferry/config.toml, copied FROM scratch; data/ becomes
# /var/lib/ferry, owned by uid 65532.
# Usage: image/build.sh [TAG]   (default ferry:latest; DOCKER_HOST picks the engine)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-ferry:latest}
cargo build --release --locked -p ferry-server
bin=target/release/ferry
ctx=target/image
rm -rf "$ctx" && mkdir -p "$ctx/rootfs"/{usr/local/bin,etc/ferry,tmp} "$ctx/data"
strip -o "$ctx/rootfs/usr/local/bin/ferry" "$bin"
# The loader and every library ldd names, at the paths the binary asks for.
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
done
cp container.toml "$ctx/rootfs/etc/ferry/config.toml"
printf 'root:x:0:0:root:/:/nonexistent\nferry:x:65532:65532:ferry:/var/lib/ferry:/nonexistent\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nferry:x:65532:\n' >"$ctx/rootfs/etc/group"
chmod 1777 "$ctx/rootfs/tmp"
cp image/Dockerfile "$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx" >/dev/null
echo "built $tag: $(docker image inspect -f '{{.Size}}' "$tag") bytes"
