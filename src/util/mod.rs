//! Small pieces every layer shares, each with one home: time helpers,
//! lock helpers, backoff, flag durations, the shutdown signal, logging setup.

pub mod backoff;
pub mod duration;
pub mod logging;
pub mod shutdown;
pub mod time;

/// Locks `m`, recovering the data of a poisoned lock (a panic elsewhere
/// must not stop the operator).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
