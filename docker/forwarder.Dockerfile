# syntax=docker/dockerfile:1.7
# The forwarder image: the `forwarder` binary only, on distroless (glibc,
# CA certificates, no shell), as UID/GID 65532. Build from the repository
# root: `make image-forwarder` or
#   docker build -f docker/forwarder.Dockerfile -t ghcr.io/modelforwarder/forwarder:0.1.0 .
# The operator starts forwarder pods with `command: [forwarder]`, so the
# binary must be on PATH (/usr/local/bin). Standalone, the embedded defaults
# listen on 127.0.0.1: publish it with
#   docker run -p 8080:8080 -e FORWARDER_SERVER__LISTEN=0.0.0.0:8080 <image>
# (no listen override is baked in: FORWARDER_* variables override the config
# file the operator renders).
ARG RUST_VERSION=1.95
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# cmake/clang: native crypto (ring, aws-lc) build scripts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p forwarder --bin forwarder \
 && install -D -m 0755 target/release/forwarder /out/forwarder

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="modelforwarder-forwarder" \
      org.opencontainers.image.description="ModelForwarder data plane: LLM message forwarder (HTTP, WebSocket, gRPC)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/forwarder /usr/local/bin/forwarder
USER 65532:65532
# 8080: HTTP APIs, WebSocket, /healthz, /readyz, /metrics. 9090: gRPC (when enabled).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/forwarder"]
CMD ["serve"]
