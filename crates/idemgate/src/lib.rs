#![doc = include_str!("../README.md")]

pub mod fingerprint;
pub mod key;
pub mod layer;
pub mod observe;
pub mod policy;
pub mod problem;
pub mod record;
pub mod scope;
pub mod store;

pub use layer::{AttemptInfo, Idempotency, IdempotencyLayer, IdempotencyLayerBuilder, OutcomeHint};
pub use policy::{Concurrency, Policy};
