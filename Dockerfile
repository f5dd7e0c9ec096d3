# ferry as a container, e.g. a k3d registry:
#   k3d registry create ferry -i IMAGE -v /var/run/docker.sock:/var/run/docker.sock
# Listens on :5000; REGISTRY_HTTP_ADDR (as k3d and distribution use it) overrides the address.
# Pulls images the engine lacks through it (container.toml); FERRY_PULL_MISSING=false turns that off.

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ferry-server \
    && strip target/release/ferry

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ferry /usr/local/bin/ferry
COPY container.toml /etc/ferry/config.toml
VOLUME /var/lib/ferry
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["serve", "--config", "/etc/ferry/config.toml"]
