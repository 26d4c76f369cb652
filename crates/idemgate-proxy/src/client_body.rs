//! The body of every response idemgate sends a client.
//!
//! While it lives its request counts as in progress, so `--client-timeout` never closes the
//! connection under it (hyper drops it once its last frame is written, or with the
//! connection); with `--access-log` it tells the request's [`AccessEntry`] how it ended.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::access_log::AccessEntry;
use crate::client_timeouts::InProgress;

/// A response body on its way to the client.
pub struct ClientBody<B: Body> {
    body: B,
    _in_progress: InProgress,
    access: Option<Arc<AccessEntry>>,
    body_bytes: u64,
    ended: bool,
}

impl<B: Body> ClientBody<B> {
    /// `body`, its request in progress while it lives, reported to `access` (if any) when it
    /// ends or is dropped.
    pub fn new(body: B, in_progress: InProgress, access: Option<Arc<AccessEntry>>) -> Self {
        ClientBody {
            body,
            _in_progress: in_progress,
            access,
            body_bytes: 0,
            ended: false,
        }
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if self.access.is_some() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    self.body_bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                Poll::Ready(None) => self.ended = true,
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B: Body> Drop for ClientBody<B> {
    fn drop(&mut self) {
        if let Some(entry) = self.access.take() {
            // hyper stops polling a body that says it is at its end, so that counts too.
            let complete = self.ended || self.body.is_end_stream();
            entry.response_ended(self.body_bytes, complete);
        }
    }
}
