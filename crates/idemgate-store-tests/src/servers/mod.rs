//! Throwaway database servers for tests: each starts its own process on a free loopback port
//! in a temp dir and stops it on drop. A missing server binary is an error, never a skip.

pub mod postgres;
pub mod redis;
