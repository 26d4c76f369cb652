//! Throwaway redis-server. STUB.
