//! `AdminBody`: an admin response body, either whole (JSON, text, the dashboard) or a
//! stream of chunks (`GET /api/events`).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// The body of every admin response.
pub struct AdminBody(Kind);

enum Kind {
    Whole(Option<Bytes>),
    /// Ends when the sender is dropped.
    Stream(mpsc::Receiver<Bytes>),
}

impl AdminBody {
    /// A body fed chunk by chunk through `rx`.
    pub fn stream(rx: mpsc::Receiver<Bytes>) -> AdminBody {
        AdminBody(Kind::Stream(rx))
    }
}

impl From<Bytes> for AdminBody {
    fn from(b: Bytes) -> AdminBody {
        AdminBody(Kind::Whole(Some(b)))
    }
}

impl From<&'static str> for AdminBody {
    fn from(s: &'static str) -> AdminBody {
        AdminBody::from(Bytes::from_static(s.as_bytes()))
    }
}

impl Body for AdminBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().0 {
            Kind::Whole(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(&self.0, Kind::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Whole(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Whole(None) => SizeHint::with_exact(0),
            Kind::Stream(_) => SizeHint::default(),
        }
    }
}
