# syntax=docker/dockerfile:1.7
# The operator image: the `operator` binary only, on distroless (glibc,
# CA certificates, no shell), as UID/GID 65532. Build from the repository
# root: `make image-operator` or
#   docker build -f docker/operator.Dockerfile -t ghcr.io/modelforwarder/operator:0.1.0 .
ARG RUST_VERSION=1.95
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p operator --bin operator \
 && install -D -m 0755 target/release/operator /out/operator

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="modelforwarder-operator" \
      org.opencontainers.image.description="ModelForwarder control plane: reconciles and autoscales ModelForwarder resources" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/operator /usr/local/bin/operator
USER 65532:65532
# /metrics, /healthz and the Alertmanager webhook POST /alerts.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/operator"]
