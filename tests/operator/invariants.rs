//! One test per DESIGN.md invariant (each fails when the invariant breaks).
