//! In-memory store. STUB: to be implemented.
