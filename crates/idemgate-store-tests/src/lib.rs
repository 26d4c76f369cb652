//! Conformance suite. STUB.
pub mod servers;
