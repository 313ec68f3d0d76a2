//! Time helpers: deadlines that may be absent, wall-clock to monotonic
//! conversion, and RFC 3339 timestamps for status.

use std::time::{Instant, SystemTime};

/// Sleeps until `at`; forever when there is no deadline (a `select!` arm
/// that never fires).
pub async fn sleep_until(at: Option<impl Into<tokio::time::Instant>>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// `t` on this process's monotonic clock; `None` when `t` is in the future
/// (the NATS server's clock runs ahead of ours).
pub fn instant_of(t: SystemTime) -> Option<Instant> {
    let age = SystemTime::now().duration_since(t).ok()?;
    Instant::now().checked_sub(age)
}

/// Now, as RFC 3339 (`2026-11-26T13:04:00.123456789Z`); empty if the clock
/// cannot be formatted.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Now in RFC 3339 with whole seconds (`metav1.Time`'s precision).
pub fn now_rfc3339_seconds() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
