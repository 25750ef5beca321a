//! The connection's socket: large bodies leave with `sendfile`, everything else with
//! `writev`.
//!
//! hyper writes a response as `writev(head, body)`, and `writev` copies every body byte
//! from the process into the socket. No hyper, tokio or socket option avoids that copy
//! (`MSG_ZEROCOPY` needs completion tracking and copies anyway on loopback), and for a
//! 4 MiB file it costs several times the rest of the request: profiles of the agent showed
//! most of its CPU in `copy_from_iter`, where nginx serves the same file with `sendfile`.
//! So this stream sits under hyper and recognises the bodies that live in the release's
//! sealed memfd (`site::sealed`): those go out with `sendfile` from the memfd, the kernel
//! referencing its pages instead of copying them, and the head before them goes out with
//! `MSG_MORE`, so head and body share the first segment (what nginx's `tcp_nopush` does).
//! hyper still frames every response; it only sees a stream that wrote the bytes it gave.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustix::net::{SendAncillaryBuffer, SendFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::site::sealed::Sealed;

/// Bodies smaller than this are copied with the head in one `writev`. Measured on
/// loopback, a 16 KiB body costs the same either way, a 32 KiB one about 10% less with
/// `sendfile`; below, the second system call costs more than the copy it saves.
pub const SENDFILE_MIN: usize = 16 * 1024;

pub struct Socket {
    stream: TcpStream,
    sealed: Option<Arc<Sealed>>,
}

impl Socket {
    pub fn new(stream: TcpStream, sealed: Option<Arc<Sealed>>) -> Self {
        Socket { stream, sealed }
    }

    /// The buffer's offset in the memfd, when it is worth sending from there.
    fn stored(&self, buf: &[u8]) -> Option<u64> {
        if buf.len() < SENDFILE_MIN {
            return None;
        }
        self.sealed.as_ref()?.offset_of(buf)
    }

    fn sendfile(&self, offset: u64, len: usize) -> io::Result<usize> {
        let sealed = self.sealed.as_ref().expect("only stored buffers are sent");
        let mut offset = offset;
        Ok(rustix::fs::sendfile(
            &self.stream,
            sealed.fd(),
            Some(&mut offset),
            len,
        )?)
    }

    /// `bufs` with `MSG_MORE`: held back until the body that follows fills the segment.
    fn send_more(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Ok(rustix::net::sendmsg(
            &self.stream,
            bufs,
            &mut SendAncillaryBuffer::default(),
            SendFlags::MORE | SendFlags::NOSIGNAL,
        )?)
    }

    /// Runs a non-blocking socket call that sends up to `want` bytes once the socket is
    /// writable.
    fn poll_io(
        &self,
        cx: &mut Context<'_>,
        want: usize,
        mut call: impl FnMut() -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.try_send(want, &mut call) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    /// One send of up to `want` bytes. One that sends less has filled the socket's buffer:
    /// its readiness is then cleared (tokio does the same after a partial write), so that
    /// the next write waits for room rather than fail once with EAGAIN.
    fn try_send(
        &self,
        want: usize,
        mut call: impl FnMut() -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut partial = None;
        let result = self.stream.try_io(Interest::WRITABLE, || {
            let n = call()?;
            if n > 0 && n < want {
                partial = Some(n);
                // Only a WouldBlock from the closure makes try_io clear the readiness.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (result, partial) {
            (_, Some(n)) => Ok(n),
            (result, None) => result,
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.stored(buf) {
            Some(offset) => self.poll_io(cx, buf.len(), || self.sendfile(offset, buf.len())),
            None => Pin::new(&mut self.stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some((at, offset)) = bufs
            .iter()
            .enumerate()
            .find_map(|(i, b)| self.stored(b).map(|offset| (i, offset)))
        else {
            return Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        };
        let len = bufs[at].len();
        if at == 0 {
            return self.poll_io(cx, len, || self.sendfile(offset, len));
        }
        let head = &bufs[..at];
        let head_len: usize = head.iter().map(|b| b.len()).sum();
        let sent = ready!(self.poll_io(cx, head_len, || self.send_more(head)))?;
        if sent < head_len {
            return Poll::Ready(Ok(sent));
        }
        // The body at once if the socket takes it (saves a round through hyper). If it does
        // not, or fails, the head counts as written and hyper's next call gets the answer.
        let body = self
            .try_send(len, || self.sendfile(offset, len))
            .unwrap_or(0);
        Poll::Ready(Ok(sent + body))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::sealed::Writer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair(sealed: Option<Arc<Sealed>>) -> (Socket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (Socket::new(accepted.unwrap().0, sealed), client.unwrap())
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Writes every buffer in full, the way hyper flushes its queue.
    async fn write_all_vectored(s: &mut Socket, mut bufs: Vec<&[u8]>) {
        while !bufs.is_empty() {
            let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
            let mut n = s.write_vectored(&slices).await.unwrap();
            assert!(n > 0);
            while n > 0 {
                let first = bufs[0];
                if n >= first.len() {
                    n -= first.len();
                    bufs.remove(0);
                } else {
                    bufs[0] = &first[n..];
                    n = 0;
                }
            }
        }
    }

    #[tokio::test]
    async fn heads_and_stored_bodies_arrive_whole_and_in_order() {
        let big = pattern(3 << 20);
        let small = pattern(100);
        let mut w = Writer::new().unwrap();
        let (big_at, small_at) = (w.append(&big).unwrap(), w.append(&small).unwrap());
        let sealed = w.seal().unwrap().unwrap();
        let (big_body, small_body) = (sealed.bytes(big_at), sealed.bytes(small_at));
        let (mut server, mut client) = pair(Some(sealed)).await;

        // Several MiB against a client that reads only later: sendfile writes part,
        // waits for room, and resumes at the right offset.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let heap_body = pattern(SENDFILE_MIN * 2);
        write_all_vectored(&mut server, vec![b"HEAD1\r\n", &big_body, b"HEAD2\r\n"]).await;
        write_all_vectored(&mut server, vec![b"HEAD3\r\n", &small_body]).await;
        write_all_vectored(&mut server, vec![b"HEAD4\r\n", &heap_body]).await;
        server
            .write_all(&big_body[1..SENDFILE_MIN + 1])
            .await
            .unwrap();
        server.shutdown().await.unwrap();
        drop(server);

        let mut want = b"HEAD1\r\n".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"HEAD2\r\nHEAD3\r\n");
        want.extend_from_slice(&small);
        want.extend_from_slice(b"HEAD4\r\n");
        want.extend_from_slice(&heap_body);
        want.extend_from_slice(&big[1..SENDFILE_MIN + 1]);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want);
    }

    #[tokio::test]
    async fn without_a_store_everything_is_written_as_usual() {
        let (mut server, mut client) = pair(None).await;
        let body = pattern(SENDFILE_MIN * 4);
        write_all_vectored(&mut server, vec![b"HEAD\r\n", &body]).await;
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got[..6], b"HEAD\r\n");
        assert!(got[6..] == body[..]);
    }
}
