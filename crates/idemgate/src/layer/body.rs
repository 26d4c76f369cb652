//! Request and response bodies of the layer.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, mpsc};

/// The error type of idemgate's bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// The body the inner service receives: the buffered bytes of a protected request (they were
    /// read to fingerprint it), or the untouched stream of an unprotected one.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Buffered { bytes: Option<Bytes> },
        Streaming { #[pin] inner: B },
    }
}

impl<B> RequestBody<B> {
    /// A buffered body.
    pub fn buffered(bytes: Bytes) -> Self {
        RequestBody {
            kind: RequestKind::Buffered {
                bytes: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }

    /// A streamed body.
    pub fn streaming(inner: B) -> Self {
        RequestBody {
            kind: RequestKind::Streaming { inner },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            RequestKindProj::Buffered { bytes } => {
                Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b))))
            }
            RequestKindProj::Streaming { inner } => match inner.poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Buffered { bytes } => bytes.is_none(),
            RequestKind::Streaming { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Buffered { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            RequestKind::Streaming { inner } => inner.size_hint(),
        }
    }
}

/// How many streamed bytes wait for the client, so the attempt can tell a slow reader.
#[derive(Default)]
pub(crate) struct ClientFlow {
    pub(crate) pending: AtomicUsize,
    pub(crate) drained: Notify,
}

/// The body the client receives from the layer.
pub struct ResponseBody {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    // Frames of a response that an idemgate-owned task drives to the end; the client reads them
    // here while the task stores them, and the task goes on if this receiver is dropped.
    Channel(
        mpsc::UnboundedReceiver<Result<Frame<Bytes>, BoxError>>,
        Arc<ClientFlow>,
    ),
    Inner(UnsyncBoxBody<Bytes, BoxError>),
}

impl ResponseBody {
    /// A complete body.
    pub fn full(bytes: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        ResponseBody {
            kind: Kind::Full(None),
        }
    }

    pub(crate) fn channel(
        rx: mpsc::UnboundedReceiver<Result<Frame<Bytes>, BoxError>>,
        flow: Arc<ClientFlow>,
    ) -> Self {
        ResponseBody {
            kind: Kind::Channel(rx, flow),
        }
    }

    /// The inner service's body, passed through untouched.
    pub fn inner<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        ResponseBody {
            kind: Kind::Inner(body.map_err(Into::into).boxed_unsync()),
        }
    }
}

impl From<Bytes> for ResponseBody {
    fn from(bytes: Bytes) -> Self {
        ResponseBody::full(bytes)
    }
}

impl Default for ResponseBody {
    fn default() -> Self {
        ResponseBody::empty()
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Full(_) => "full",
            Kind::Channel(..) => "channel",
            Kind::Inner(_) => "inner",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Channel(rx, flow) => {
                let polled = rx.poll_recv(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled
                    && let Some(data) = frame.data_ref()
                {
                    flow.pending.fetch_sub(data.len(), Ordering::AcqRel);
                    flow.drained.notify_one();
                }
                polled
            }
            Kind::Inner(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Channel(..) => false,
            Kind::Inner(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Channel(..) => SizeHint::default(),
            Kind::Inner(body) => body.size_hint(),
        }
    }
}
