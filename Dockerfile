# syntax=docker/dockerfile:1
# Slipstream image: the `slipstream` binary on distroless, as non-root 65532.
#   docker build -t slipstream:dev .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary
# is copied out of the cached target dir, stripped as `make dist` strips it
# (scripts/dist.sh strip: no symbols or line tables; slipstream.debug stays in
# the build stage), before the layer is committed.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin slipstream \
 && scripts/dist.sh strip target/release/slipstream /out

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/slipstream /usr/local/bin/slipstream
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/slipstream"]
CMD ["run"]
