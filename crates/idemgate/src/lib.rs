#![doc = include_str!("../README.md")]

pub mod fingerprint;
pub mod key;
pub mod policy;
pub mod problem;
pub mod record;
pub mod scope;
pub mod store;
