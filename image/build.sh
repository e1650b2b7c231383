#!/usr/bin/env bash
# Builds the fleetlb container image with buildah, FROM scratch, pulling nothing: the static
# (musl, mimalloc) binary, CA certificates, a non-root user (65532) and a writable /tmp. The
# Dockerfile at the top of the repository makes the same layout for users with a registry.
#   image/build.sh [TAG]          default TAG: localhost/fleetlb:dev
#   PROFILE=release image/build.sh   a quicker build than the shipped `dist` profile (LTO)
# Needs: rustup's x86_64-unknown-linux-musl target, Debian's musl-tools, buildah and
# ca-certificates (installed here when missing and run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-localhost/fleetlb:dev}
profile=${PROFILE:-dist}
target=x86_64-unknown-linux-musl

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
missing=()
command -v musl-gcc >/dev/null || missing+=(musl-tools)
command -v buildah >/dev/null || missing+=(buildah)
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
if [ ${#missing[@]} -gt 0 ]; then
  echo "image/build.sh: installing ${missing[*]} (Debian)" >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target" >&2

CC_x86_64_unknown_linux_musl=musl-gcc cargo build --locked --profile "$profile" \
  --target "$target" --bin fleetlb >&2
dir=$profile
[ "$profile" = dev ] && dir=debug
bin=target/$target/$dir/fleetlb

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/usr/local/bin"
chmod 1777 "$root/tmp"
install -m 0755 "$bin" "$root/usr/local/bin/fleetlb"
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$root.tar" .

ctr=$(buildah from scratch)
buildah add "$ctr" "$root.tar" / >/dev/null
rm -f "$root.tar"
buildah config \
  --user 65532:65532 \
  --workingdir /tmp \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --port 8000 --port 9090 \
  --entrypoint '["/usr/local/bin/fleetlb"]' \
  --cmd run \
  --label org.opencontainers.image.title=fleetlb \
  --label "org.opencontainers.image.version=$("$bin" --version | awk '{print $2}')" \
  "$ctr"
buildah commit --quiet --rm "$ctr" "$tag" >/dev/null
echo "$tag"
