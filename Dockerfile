# Multi-stage build: a static musl binary on a distroless, non-root base.
#   docker build -t fleetlb .
FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --profile dist --locked --target x86_64-unknown-linux-musl --bin fleetlb \
 && cp target/x86_64-unknown-linux-musl/dist/fleetlb /fleetlb

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /fleetlb /usr/local/bin/fleetlb
USER 65532:65532
EXPOSE 8000 9090
ENTRYPOINT ["/usr/local/bin/fleetlb"]
CMD ["run"]
