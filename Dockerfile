# syntax=docker/dockerfile:1
# Multi-stage build of agent-activator: the release binary on a distroless, non-root base
# (no shell, no package manager). The same image runs the demo sandbox
# (`agent-activator demo-sandbox`), which the example SandboxTemplate uses.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds without baking them in.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin agent-activator \
 && cp target/release/agent-activator /agent-activator \
 && strip /agent-activator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /agent-activator /usr/local/bin/agent-activator
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/agent-activator"]
CMD ["serve", "--config", "/etc/agent-activator/activator.yaml"]
