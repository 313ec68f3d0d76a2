//! Slipstream on the real control plane (kube-apiserver, etcd and
//! kube-controller-manager from `make tools`, see `apiserver::real`), always:
//! the chart installs and its RBAC is enough and no more, the operator binary
//! runs as the chart's ServiceAccount with the chart's flags, kubectl reads
//! our CRD, and the real namespace and garbage-collector controllers clean up
//! after deleted bindings.
//!
//! Every test gets fresh namespaces on the binary's one control plane and
//! scopes each operator it starts to its own namespace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod chart;
mod kubectl;
mod lifecycle;
mod rbac;
mod support;
