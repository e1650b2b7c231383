# The image for users with a registry: the same layout image/build.sh makes with buildah (a
# static musl binary allocating with mimalloc, CA certificates, user 65532, a writable /tmp,
# FROM scratch).
#   docker build -t fleetlb .
FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl \
 && apt-get update \
 && apt-get install -y --no-install-recommends musl-tools ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN CC_x86_64_unknown_linux_musl=musl-gcc cargo build --profile dist --locked \
      --target x86_64-unknown-linux-musl --bin fleetlb \
 && mkdir -p /out/etc/ssl/certs /out/tmp /out/usr/local/bin \
 && chmod 1777 /out/tmp \
 && install -m 0755 target/x86_64-unknown-linux-musl/dist/fleetlb /out/usr/local/bin/fleetlb \
 && install -m 0644 /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/ \
 && printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' >/out/etc/passwd \
 && printf 'root:x:0:\nnonroot:x:65532:\n' >/out/etc/group

FROM scratch
COPY --from=build /out/ /
USER 65532:65532
WORKDIR /tmp
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
EXPOSE 8000 9090
ENTRYPOINT ["/usr/local/bin/fleetlb"]
CMD ["run"]
