//! Response bodies: small in-memory ones, and blobs streamed from storage in
//! large pieces without ever holding a whole blob in memory.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncRead;

/// The body type of every response.
pub type ResponseBody = UnsyncBoxBody<Bytes, io::Error>;

pub fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Size of each piece read from storage: large enough that a 1 GiB blob is a
/// few hundred reads, small enough that many concurrent streams stay cheap.
const PIECE: usize = 512 * 1024;

/// Streams exactly `remaining` bytes from a reader, calling `on_bytes` with the
/// size of each piece sent (for metrics).
pub struct ReaderBody<R, F> {
    reader: R,
    remaining: u64,
    buf: BytesMut,
    on_bytes: F,
}

impl<R, F> ReaderBody<R, F> {
    pub fn new(reader: R, len: u64, on_bytes: F) -> Self {
        ReaderBody {
            reader,
            remaining: len,
            buf: BytesMut::new(),
            on_bytes,
        }
    }
}

impl<R, F> Body for ReaderBody<R, F>
where
    R: AsyncRead + Unpin,
    F: FnMut(u64) + Unpin,
{
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        if this.buf.capacity() < PIECE {
            this.buf.reserve(PIECE);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.reader), cx, &mut this.buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(0)) => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("blob ended {} bytes early", this.remaining),
            )))),
            Poll::Ready(Ok(_)) => {
                let mut chunk = this.buf.split().freeze();
                if chunk.len() as u64 > this.remaining {
                    chunk.truncate(this.remaining as usize);
                }
                this.remaining -= chunk.len() as u64;
                (this.on_bytes)(chunk.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
