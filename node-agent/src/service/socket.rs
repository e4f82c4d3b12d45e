//! A client's TCP socket for its WebSocket session, with a read buffer that
//! exists only while bytes read from the socket wait to be parsed.
//!
//! Most edge connections sit idle for minutes between small messages. A
//! read buffer kept per connection would be most of what an idle one costs,
//! so the session's WebSocket codec is given a small buffer of its own
//! (`READ_CHUNK` in `service`), and this socket reads what the kernel has in
//! one call into a buffer allocated at that moment and freed as soon as the
//! codec has taken the last byte of it.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::transport::Transport;

/// The most read from the kernel in one call.
const READ_AT_ONCE: usize = 16 * 1024;

#[derive(Debug)]
pub struct ClientSocket {
    tcp: Transport,
    /// Read and not yet taken; `None` while there is nothing.
    pending: Option<BytesMut>,
}

impl ClientSocket {
    /// `early` holds bytes the client sent right behind its handshake, read
    /// before the upgrade.
    pub fn new(tcp: impl Into<Transport>, early: &[u8]) -> ClientSocket {
        ClientSocket {
            tcp: tcp.into(),
            pending: (!early.is_empty()).then(|| BytesMut::from(early)),
        }
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_none() {
            if out.remaining() >= READ_AT_ONCE {
                // A caller with room for a whole read needs no buffer of ours.
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
            // Read onto the stack first: a buffer is allocated only for
            // bytes that are really there, never on a stale wakeup.
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_AT_ONCE];
            let mut read = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut read))?;
            let filled = read.filled();
            let n = out.remaining().min(filled.len());
            out.put_slice(&filled[..n]);
            if filled.len() > n {
                this.pending = Some(BytesMut::from(&filled[n..]));
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(pending) = &mut this.pending {
            let n = out.remaining().min(pending.len());
            out.put_slice(&pending[..n]);
            pending.advance(n);
            if pending.is_empty() {
                this.pending = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn pair() -> (ClientSocket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (
            ClientSocket::new(accepted.unwrap().0, b"early"),
            client.unwrap(),
        )
    }

    #[tokio::test]
    async fn hands_out_early_bytes_then_the_socket_in_small_reads_and_frees_the_buffer() {
        let (mut socket, mut peer) = pair().await;
        let body: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        peer.write_all(&body).await.unwrap();
        peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 100];
        loop {
            let n = socket.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(&got[..5], b"early");
        assert_eq!(&got[5..], &body[..]);
        assert!(socket.pending.is_none(), "nothing held once all is taken");
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut socket, mut peer) = pair().await;
        socket.write_all(b"hello").await.unwrap();
        socket.flush().await.unwrap();
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
    }
}
