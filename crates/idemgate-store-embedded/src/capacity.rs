//! The capacity bound: free space on the file's filesystem and an optional file-size cap.
//!
//! Asking the kernel on every `acquire` would put a syscall pair on the hot path for a number
//! that moves slowly, so the answer is cached and refreshed at most every [`REFRESH`]. Only the
//! writer thread uses it, so it needs no lock.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a free-space reading is trusted.
pub(crate) const REFRESH: Duration = Duration::from_secs(1);

pub(crate) struct Capacity {
    path: PathBuf,
    min_free_bytes: u64,
    max_file_bytes: Option<u64>,
    /// When the cached verdict was taken, and the verdict (`Some(reason)` when full).
    cached: Option<(Instant, Option<String>)>,
}

impl Capacity {
    pub(crate) fn new(path: PathBuf, min_free_bytes: u64, max_file_bytes: Option<u64>) -> Self {
        Capacity {
            path,
            min_free_bytes,
            max_file_bytes,
            cached: None,
        }
    }

    /// `Some(reason)` when a new record must be refused.
    pub(crate) fn full(&mut self) -> Option<String> {
        if self.min_free_bytes == 0 && self.max_file_bytes.is_none() {
            return None;
        }
        let now = Instant::now();
        match &self.cached {
            Some((at, verdict)) if now.duration_since(*at) < REFRESH => verdict.clone(),
            _ => {
                let verdict = self.measure();
                self.cached = Some((now, verdict.clone()));
                verdict
            }
        }
    }

    fn measure(&self) -> Option<String> {
        if let Some(max) = self.max_file_bytes {
            // A file we cannot stat is not evidence of fullness; the write itself will report
            // a real I/O problem.
            if let Ok(meta) = std::fs::metadata(&self.path)
                && meta.len() >= max
            {
                return Some(format!(
                    "store file is {} bytes, at or over max_file_bytes {max}",
                    meta.len()
                ));
            }
        }
        if self.min_free_bytes > 0
            && let Some(free) = available_bytes(&self.path)
            && free < self.min_free_bytes
        {
            return Some(format!(
                "{free} bytes free on the store's filesystem, below min_free_bytes {}",
                self.min_free_bytes
            ));
        }
        None
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
#[cfg(unix)]
pub(crate) fn available_bytes(path: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Free space is not measured on this platform; only the file-size cap applies.
#[cfg(not(unix))]
pub(crate) fn available_bytes(_path: &std::path::Path) -> Option<u64> {
    None
}
