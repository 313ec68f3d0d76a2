//! A compare-and-swap lease kept in a KV bucket.
