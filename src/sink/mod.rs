//! Where projected content goes: `configmap` writes a ConfigMap with one
//! server-side apply per change; `dir` lays content out like a ConfigMap volume.

pub mod configmap;
pub mod dir;
