//! Slipstream
