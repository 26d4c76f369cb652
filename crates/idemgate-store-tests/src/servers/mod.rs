//! Throwaway database servers for tests: each starts its own process on a free loopback port
//! in a temp dir and stops it on drop. A missing server binary is an error, never a skip.

pub mod postgres;
pub mod redis;

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

/// Ports this process has handed to a server already.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that is free now and that this process has never handed out before.
///
/// Why never twice: a test that kills its server expects the port to stay dead, and a server
/// another test starts meanwhile must not land on it (the kernel readily hands out a port that
/// was just released), or the first test's client would talk to the wrong server.
/// `acceptable` rejects ports for reasons of the caller's own (a standard port, a busy bus).
pub(crate) fn unused_port(acceptable: impl Fn(u16) -> bool) -> Option<u16> {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..200 {
        let Ok(port) = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
        else {
            continue;
        };
        if !handed.contains(&port) && acceptable(port) {
            handed.insert(port);
            return Some(port);
        }
    }
    None
}
