#!/usr/bin/env bash
# `make lint`: rustfmt check and clippy -D warnings. A component that is
# missing is added with rustup once; one that cannot be had is reported
# plainly and skipped, so the rest of `make test` still runs.
set -euo pipefail
cargo="${CARGO:-cargo}"

have() { # component, probe subcommand
  "$cargo" "$2" --version >/dev/null 2>&1 && return 0
  if command -v rustup >/dev/null 2>&1; then
    echo "lint: adding the $1 component (rustup component add $1)" >&2
    rustup component add "$1" >/dev/null 2>&1 || true
  fi
  "$cargo" "$2" --version >/dev/null 2>&1
}

if have rustfmt fmt; then
  "$cargo" fmt --all --check
else
  echo "lint: rustfmt is not available on this machine (rustup component add rustfmt failed); formatting NOT checked" >&2
fi
if have clippy clippy; then
  "$cargo" clippy --workspace --all-targets --locked -- -D warnings
else
  echo "lint: clippy is not available on this machine (rustup component add clippy failed); clippy NOT run" >&2
fi
