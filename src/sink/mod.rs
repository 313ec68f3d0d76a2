//! Where projected content goes: `configmap` writes a ConfigMap with one
//! server-side apply per change.

pub mod configmap;
