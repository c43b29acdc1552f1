//! Bodies: small in-memory ones, blobs served straight from a memory map of
//! their file, and any async reader streamed in pieces. No body ever holds a
//! whole blob in memory.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
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

/// Pieces handed to hyper from a mapped blob.
const MAPPED_PIECE: usize = 4 << 20;

/// One piece of a mapped blob, owned by the `Bytes` hyper writes from. When
/// hyper drops it (the bytes are on the socket), its pages are dropped from
/// this process's page tables, so serving a 1 GiB blob never grows RSS by more
/// than a few pieces; the page cache keeps the data for the next reader.
struct MappedPiece {
    map: Arc<memmap2::Mmap>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for MappedPiece {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

impl Drop for MappedPiece {
    fn drop(&mut self) {
        // SAFETY: DONTNEED on a shared, read-only file mapping only discards
        // page-table entries; a later access (another piece sharing a boundary
        // page) faults the same file data back in. This piece is never read again.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.start,
                self.len,
            )
        };
    }
}

/// Streams `len` bytes of a memory map starting at `start`.
pub struct MappedBody {
    map: Arc<memmap2::Mmap>,
    pos: usize,
    end: usize,
}

impl MappedBody {
    pub fn new(map: memmap2::Mmap, start: usize, len: usize) -> Self {
        debug_assert!(start + len <= map.len());
        MappedBody {
            map: Arc::new(map),
            pos: start,
            end: start + len,
        }
    }
}

impl Body for MappedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        let len = (this.end - this.pos).min(MAPPED_PIECE);
        // Fill the piece's page-table entries in one call (the data is usually
        // in the page cache) instead of taking a fault per page while the
        // kernel copies it to the socket. Older kernels lack it: faults then.
        let _ = this
            .map
            .advise_range(memmap2::Advice::PopulateRead, this.pos, len);
        let piece = MappedPiece {
            map: this.map.clone(),
            start: this.pos,
            len,
        };
        this.pos += len;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_owner(piece)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.end - self.pos) as u64)
    }
}

/// Wraps a body and reports the size of every data frame that passes.
pub struct Counted<B, F> {
    inner: B,
    on_bytes: F,
}

impl<B, F> Counted<B, F> {
    pub fn new(inner: B, on_bytes: F) -> Self {
        Counted { inner, on_bytes }
    }
}

impl<B, F> Body for Counted<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    F: FnMut(u64) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                (this.on_bytes)(data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
