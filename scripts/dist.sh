#!/usr/bin/env bash
# `make dist`: the release artifacts in ./dist (git-ignored).
#   slipstream-<version>-<target>.tar.gz        stripped binary, README.md, LICENSE, CHANGELOG.md
#   slipstream-<version>-<target>-debug.tar.gz  slipstream.debug: the symbols and line tables
#                                               the binary was stripped of (gdb, addr2line and
#                                               perf find it through the binary's .gnu_debuglink)
#   slipstream-<version>.tgz                    the packaged Helm chart (helm package)
#   SHA256SUMS                                  of the three
# Builds with `cargo build --release --locked` unless DIST_NO_BUILD=1 (then the
# release binary already built is packaged). Archives are reproducible: sorted,
# owned by 0:0, dated at the last commit.
#
# `scripts/dist.sh strip BINARY OUTDIR` only writes OUTDIR/slipstream (stripped)
# and OUTDIR/slipstream.debug; the Dockerfile strips the image's binary with it.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"

# strip_binary IN OUTDIR
strip_binary() {
  local in=$1 out=$2
  command -v objcopy >/dev/null || { echo "dist: objcopy (binutils) is needed to strip the binary" >&2; exit 1; }
  mkdir -p "$out"
  objcopy --only-keep-debug "$in" "$out/slipstream.debug"
  chmod 0644 "$out/slipstream.debug"
  # The debuglink records the debug file's name and CRC; it is resolved
  # beside the binary or under /usr/lib/debug.
  (cd "$out" && objcopy --strip-all --add-gnu-debuglink=slipstream.debug "$in" slipstream)
  chmod 0755 "$out/slipstream"
}

if [ "${1:-}" = strip ]; then
  [ $# -eq 3 ] || { echo "usage: scripts/dist.sh strip BINARY OUTDIR" >&2; exit 2; }
  in="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
  strip_binary "$in" "$3"
  exit 0
fi

cd "$root"
export PATH="$root/.tools/bin:$PATH"
command -v helm >/dev/null || { echo "dist: helm is needed (make tools-pypi installs it)" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
chart_version="$(sed -n 's/^version: //p' charts/slipstream/Chart.yaml)"
app_version="$(sed -n 's/^appVersion: "\(.*\)"$/\1/p' charts/slipstream/Chart.yaml)"
if [ "$version" != "$chart_version" ] || [ "$version" != "$app_version" ]; then
  echo "dist: Cargo.toml version $version, chart version $chart_version and appVersion $app_version must agree" >&2
  exit 1
fi
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
triple="$(rustc -vV | sed -n 's/^host: //p')"

if [ "${DIST_NO_BUILD:-0}" != 1 ]; then
  cargo build --release --locked --bin slipstream
fi
bin="$target_dir/release/slipstream"
[ -x "$bin" ] || { echo "dist: $bin missing (build it, or unset DIST_NO_BUILD)" >&2; exit 1; }

dist="$root/dist"
name="slipstream-$version-$triple"
rm -rf "$dist"
mkdir -p "$dist/$name" "$dist/$name-debug"
strip_binary "$bin" "$dist/stripped"
mv "$dist/stripped/slipstream" "$dist/$name/"
mv "$dist/stripped/slipstream.debug" "$dist/$name-debug/"
rmdir "$dist/stripped"
install -m 0644 README.md LICENSE CHANGELOG.md "$dist/$name/"

export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
tar_reproducible() {
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
    -C "$dist" -cf - "$1" | gzip -n -9 >"$dist/$1.tar.gz"
}
tar_reproducible "$name"
tar_reproducible "$name-debug"
rm -rf "${dist:?}/$name" "${dist:?}/$name-debug"

helm package charts/slipstream --destination "$dist" >/dev/null

(cd "$dist" && sha256sum -- *.tar.gz *.tgz >SHA256SUMS)

echo "dist: $(basename "$bin") $(stat -c %s "$bin") bytes as built (target/release), stripped in $name.tar.gz:"
tar -tvzf "$dist/$name.tar.gz" | sed 's/^/  /'
echo "dist: in $dist"
(cd "$dist" && ls -l -- *.tar.gz *.tgz SHA256SUMS | sed 's/^/  /' && sed 's/^/  /' SHA256SUMS)
