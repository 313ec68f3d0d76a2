//! NATS JetStream implementation of the KV traits.
