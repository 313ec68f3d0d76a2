#!/usr/bin/env bash
# kind e2e: image -> kind cluster -> NATS + chart -> example binding and pods.
# Needs docker, kind, kubectl and helm. Deletes the cluster on exit unless
# KEEP_CLUSTER=1.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
export PATH="$root/.tools/bin:$PATH"
cluster="${KIND_CLUSTER:-slipstream-e2e}"
image="slipstream:e2e"
ns=default

for tool in docker kind kubectl helm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "e2e: '$tool' not found. The kind e2e needs docker, kind, kubectl and helm" >&2
    echo "e2e: (kubectl and helm: make tools; kind: https://kind.sigs.k8s.io)." >&2
    exit 2
  fi
done
if ! docker info >/dev/null 2>&1; then
  echo "e2e: docker is installed but no Docker engine answers (docker info failed)." >&2
  exit 2
fi

step() { printf '\n==> %s\n' "$*"; }
fail() { echo "e2e: FAIL: $*" >&2; exit 1; }

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    kubectl -n slipstream-system logs -l app.kubernetes.io/name=slipstream --tail=50 --prefix 2>/dev/null || true
  fi
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "e2e: keeping cluster $cluster (kind delete cluster --name $cluster)"
  else
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND until it succeeds.
wait_for() {
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for: $what"
    sleep 1
  done
  echo "ok: $what"
}

# kv ARGS...: `slipstream kv` in a throwaway pod next to NATS.
kv() {
  kubectl -n nats run "kv-$RANDOM$RANDOM" --rm -i --quiet --restart=Never \
    --image="$image" --image-pull-policy=Never -- \
    kv --nats nats://nats.nats.svc:4222 "$@"
}

cm_value() { kubectl -n "$ns" get configmap web-config -o "jsonpath={.data.$1}"; }
cm_is() { [ "$(cm_value "$1")" = "$2" ]; }
cm_lacks() { kubectl -n "$ns" get configmap web-config >/dev/null && [ -z "$(cm_value "$1")" ]; }
file_is() { [ "$(kubectl -n "$ns" exec "deploy/$1" -c app -- cat "$2")" = "$3" ]; }
lease_holder() { kv --bucket slipstream-leases get slipstream.leader || true; }

step "kind cluster $cluster"
kind create cluster --name "$cluster" --wait 120s

step "image $image"
docker build -t "$image" "$root"
kind load docker-image "$image" --name "$cluster"

step "NATS with JetStream"
kubectl apply -f "$root/tests/e2e/nats.yaml"
kubectl -n nats rollout status deploy/nats --timeout=180s

step "chart (2 replicas, leader election)"
helm install slipstream "$root/charts/slipstream" -n slipstream-system --create-namespace \
  --set image.repository=slipstream --set image.tag=e2e --set image.pullPolicy=Never \
  --set nats.url=nats://nats.nats.svc:4222 --set logFormat=text --set rollout.enabled=true \
  --wait --timeout 180s

step "bucket, keys and the example binding"
kv --bucket app-config create-bucket
kv --bucket app-config put web.greeting hello
kubectl -n "$ns" apply -f "$root/examples/configbinding.yaml" -f "$root/examples/deployment-volume.yaml"
sed "s#ghcr.io/slipstream-io/slipstream:0.1.0#$image#" \
  "$root/examples/sidecar-sync.yaml" | kubectl -n "$ns" apply -f -
wait_for 60 "ConfigMap web-config has greeting=hello" cm_is greeting hello
kubectl -n "$ns" wait configbinding/web --for=condition=Ready --timeout=60s

step "a mounting pod sees a changed file"
kubectl -n "$ns" rollout status deploy/web-files --timeout=180s
kubectl -n "$ns" rollout status deploy/web-sidecar --timeout=180s
wait_for 30 "web-files reads hello" file_is web-files /etc/web/greeting hello
kv --bucket app-config put web.greeting changed
wait_for 30 "ConfigMap has greeting=changed" cm_is greeting changed
wait_for 10 "sidecar dir has greeting=changed" file_is web-sidecar /config/greeting changed
wait_for 150 "kubelet-mounted file has greeting=changed" file_is web-files /etc/web/greeting changed

step "a deleted key disappears"
kv --bucket app-config put web.extra temporary
wait_for 30 "ConfigMap has extra" cm_is extra temporary
kv --bucket app-config del web.extra
wait_for 30 "ConfigMap lost extra" cm_lacks extra

step "a second replica takes over when the leader pod is deleted"
pods="$(kubectl -n slipstream-system get pods -l app.kubernetes.io/name=slipstream -o name | sed 's#pod/##')"
record="$(lease_holder)"
leader=""
for p in $pods; do
  if grep -q "$p" <<<"$record"; then leader="$p"; fi
done
[ -n "$leader" ] || fail "no running pod holds the lease: $record"
echo "leader: $leader"
kubectl -n slipstream-system delete pod "$leader" --wait=false
kv --bucket app-config put web.greeting after-failover
wait_for 30 "ConfigMap has greeting=after-failover" cm_is greeting after-failover
record="$(lease_holder)"
if grep -q "$leader" <<<"$record"; then fail "the deleted pod still holds the lease: $record"; fi
echo "new lease record: $record"

step "PASS"
