# ferry's container image: one static binary FROM scratch.
#   docker build -t ferry .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ferry .
#   k3d registry create ferry -i ferry -p 5000 -v /var/run/docker.sock:/var/run/docker.sock
# The builder runs on the build machine's own platform and cross-compiles for the target's
# (TARGETARCH, set by BuildKit; the builder's own arch when unset), so a multi-platform build
# needs no emulation. RUST_IMAGE picks the builder's base: any Debian with rustup and gcc.
# Listens on :5000; REGISTRY_HTTP_ADDR (as k3d and distribution set it) moves it. Started as
# root (k3d's way), ferry drops to uid 65532 keeping only the group of each engine socket it
# is configured for (FERRY_DROP_TO); started with --user 65532 --group-add <socket gid> it
# never is root at all.
ARG RUST_IMAGE=docker.io/library/rust:1-bookworm

FROM --platform=$BUILDPLATFORM ${RUST_IMAGE} AS build
ARG TARGETARCH
# A commit to name in `ferry --version` when the context has no .git.
ARG SOURCE_COMMIT=
# Smaller than the repository's release profile (which keeps line tables for profiling on
# the host): no debug info, symbols stripped, whole-program LTO. Measured on 2 cores for
# x86_64: 19.3 MB in 374 s; thin LTO builds in 299 s but is 22.6 MB.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_RELEASE_LTO=true
WORKDIR /src
# protoc for containerd's API, make for jemalloc's build; the musl target of TARGETARCH, and
# Debian's gcc for that arch when it is not the builder's own (.cargo/config.toml names it as
# linker and C compiler).
RUN set -eu; native=$(dpkg --print-architecture); arch=${TARGETARCH:-$native}; \
    case "$arch" in amd64) cpu=x86_64 ;; arm64) cpu=aarch64 ;; \
        *) echo "ferry builds for amd64 and arm64, not $arch" >&2; exit 1 ;; esac; \
    cross=""; [ "$arch" = "$native" ] || cross="gcc-$(echo $cpu | tr _ -)-linux-gnu libc6-dev-$arch-cross"; \
    apt-get update -q && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends protobuf-compiler make $cross && \
    rm -rf /var/lib/apt/lists/*; \
    rustup target add "$cpu-unknown-linux-musl"; echo "$cpu-unknown-linux-musl" >/target
# Dependencies in a layer of their own, built from the manifests and empty crates: a change
# to ferry's code does not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY core/Cargo.toml core/
COPY backends/Cargo.toml backends/
COPY server/Cargo.toml server/
COPY tests/Cargo.toml tests/
RUN mkdir -p core/src backends/src server/src tests/src && \
    touch core/src/lib.rs backends/src/lib.rs server/src/lib.rs tests/src/lib.rs && \
    echo 'fn main() {}' >server/src/main.rs && \
    cargo build --release --locked --target "$(cat /target)" -p ferry-server && \
    rm -rf core/src backends/src server/src tests/src
COPY . .
# COPY keeps the files' own times, older than the empty crates': touch them so cargo rebuilds.
RUN find core backends server -name '*.rs' -exec touch {} + && \
    cargo build --release --locked --target "$(cat /target)" -p ferry-server && \
    mkdir -p /out/usr/local/bin /out/etc/ferry /out/tmp /out/data && \
    cp "target/$(cat /target)/release/ferry" /out/usr/local/bin/ferry && \
    cp container.toml /out/etc/ferry/config.toml && \
    printf 'root:x:0:0:root:/:/nonexistent\nferry:x:65532:65532:ferry:/var/lib/ferry:/nonexistent\n' >/out/etc/passwd && \
    printf 'root:x:0:\nferry:x:65532:\n' >/out/etc/group && \
    chmod 1777 /out/tmp

FROM scratch
COPY --from=build /out/usr /usr
COPY --from=build /out/etc /etc
COPY --from=build /out/tmp /tmp
# The data directory belongs to ferry's user (a new volume takes its owner from here).
COPY --from=build --chown=65532:65532 /out/data /var/lib/ferry
ENV FERRY_DROP_TO=65532:65532
VOLUME /var/lib/ferry
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=6s --start-period=5s \
    CMD ["/usr/local/bin/ferry", "healthcheck", "--config", "/etc/ferry/config.toml"]
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["serve", "--config", "/etc/ferry/config.toml"]
