//! The postgres store. STUB: to be implemented.
