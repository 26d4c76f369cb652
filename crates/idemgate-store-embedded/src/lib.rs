//! The embedded store. STUB: to be implemented.
