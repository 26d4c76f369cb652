//! Throwaway PostgreSQL. STUB.
