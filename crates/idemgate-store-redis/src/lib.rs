//! The redis store. STUB: to be implemented.
