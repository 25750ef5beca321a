//! A connection's first request line, read before hyper parses it, for its version.
//!
//! hyper's parser knows `HTTP/1.0` and `HTTP/1.1` and answers any other version with a
//! bare 400. HTTP asks more of a server (RFC 9110 §2.5, RFC 9112 §2.3): a higher minor
//! version of a major version it implements is served as the highest minor it implements
//! (`HTTP/1.2` is HTTP/1.1), and a major version it does not implement gets 505
//! (§15.6.6). A client does not change versions within a connection, so only the first
//! request line is read here: held back until its end, its version rewritten to
//! `HTTP/1.1` (the same 8 bytes) when hyper would refuse it, and what it asked for
//! reported ([`LineVersion`]). The service then answers and closes the connection, so no
//! later request, sent with the same version, reaches hyper's parser as it was sent.
//!
//! Everything after the first line passes through untouched. A first line that arrives
//! whole in one read, as it nearly always does, is looked at in hyper's own buffer: no
//! copy and no allocation. Only a line split across reads is collected here, at most
//! [`MAX_LINE_BYTES`] of it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use super::response::MAX_TARGET_BYTES;

/// Longest first line looked at: the longest target answered, plus room for a method and
/// the version. A line still without its end past this goes to hyper as it came (its
/// target then gets 414 as usual, or hyper's 400 for a version it does not know).
pub const MAX_LINE_BYTES: usize = MAX_TARGET_BYTES + 128;

/// What a held line grows by per read: a line sent a byte at a time costs a few bytes of
/// memory, not the whole limit.
const HOLD_CHUNK: usize = 1024;

/// What a connection's first request line asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum LineVersion {
    /// `HTTP/1.0` or `HTTP/1.1`, or a line hyper is left to judge (not a request line,
    /// no version, more than one digit, or no end within [`MAX_LINE_BYTES`]).
    #[default]
    Http1 = 0,
    /// `HTTP/1.2` to `HTTP/1.9`: served as HTTP/1.1.
    LaterMinor = 1,
    /// `HTTP/2.0` to `HTTP/9.9`, other than the HTTP/2 preface: 505.
    OtherMajor = 2,
    /// `PRI * HTTP/2.0`, the start of an HTTP/2 connection preface (RFC 9113 §3.4) from a
    /// client that assumed HTTP/2 without asking: 400, as nginx answers.
    H2Preface = 3,
}

impl LineVersion {
    pub fn from_u8(value: u8) -> Self {
        match value {
            1 => LineVersion::LaterMinor,
            2 => LineVersion::OtherMajor,
            3 => LineVersion::H2Preface,
            _ => LineVersion::Http1,
        }
    }
}

/// Reads a connection's first request line; see the module's documentation.
#[derive(Debug, Default)]
pub struct FirstLine {
    state: State,
}

#[derive(Debug, Default)]
enum State {
    /// Nothing read yet.
    #[default]
    Start,
    /// The line has begun but not ended: what arrived so far, and where the line starts
    /// (after the empty lines a client may send first, RFC 9112 §2.2).
    Holding { held: Vec<u8>, start: usize },
    /// The line, rewritten if need be, and what came after it in the same reads, being
    /// handed on; `at` bytes of it are.
    Draining { held: Vec<u8>, at: usize },
    /// The first line has gone by: reads go straight through.
    Done,
}

impl FirstLine {
    /// True while bytes the client sent are held back: the request has begun.
    pub fn is_holding(&self) -> bool {
        matches!(self.state, State::Holding { .. })
    }

    /// Reads from `inner` into `buf` the way `AsyncRead::poll_read` does, holding back a
    /// first line that has not ended yet. `found` hears what the line asked for once it
    /// has ended, before any of it is returned.
    pub fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        inner: &mut S,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        mut found: impl FnMut(LineVersion),
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Done => return Pin::new(inner).poll_read(cx, buf),
                State::Start => {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut *inner).poll_read(cx, buf))?;
                    let new = &mut buf.filled_mut()[before..];
                    let mut start = 0;
                    if let Some(end) = line_end(new, &mut start, 0) {
                        found(rewrite(&mut new[start..end]));
                    } else if !new.is_empty() && new.len() <= MAX_LINE_BYTES {
                        // Split across reads: keep it until its end is here.
                        let held = new.to_vec();
                        buf.set_filled(before);
                        self.state = State::Holding { held, start };
                        continue;
                    }
                    self.state = State::Done;
                    return Poll::Ready(Ok(()));
                }
                State::Holding { held, start } => {
                    let from = held.len();
                    held.resize(from + HOLD_CHUNK.min(MAX_LINE_BYTES + 1 - from), 0);
                    let mut more = ReadBuf::new(&mut held[from..]);
                    let polled = Pin::new(&mut *inner).poll_read(cx, &mut more);
                    let n = more.filled().len();
                    held.truncate(from + n);
                    ready!(polled)?;
                    if let Some(end) = line_end(held, start, from) {
                        found(rewrite(&mut held[*start..end]));
                    } else if n > 0 && held.len() <= MAX_LINE_BYTES {
                        continue;
                    }
                    // Ended, too long, or the client closed: hand it all on.
                    let held = std::mem::take(held);
                    self.state = State::Draining { held, at: 0 };
                }
                State::Draining { held, at } => {
                    let n = buf.remaining().min(held.len() - *at);
                    buf.put_slice(&held[*at..*at + n]);
                    *at += n;
                    if *at == held.len() {
                        self.state = State::Done;
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// Where the request line in `bytes` ends (its LF), searching from `from`. `start` is
/// where it begins; empty lines before it are skipped, moving `start`, as hyper's parser
/// skips them.
fn line_end(bytes: &[u8], start: &mut usize, mut from: usize) -> Option<usize> {
    while let Some(i) = bytes[from..].iter().position(|&b| b == b'\n') {
        let lf = from + i;
        if !matches!(&bytes[*start..lf], [] | [b'\r']) {
            return Some(lf);
        }
        *start = lf + 1;
        from = lf + 1;
    }
    None
}

/// What a request line (without its LF) asks for; a version hyper would refuse but that
/// has an answer here becomes `HTTP/1.1`. Only `SP "HTTP/" DIGIT "." DIGIT` at the end of
/// the line counts (RFC 9112 §2.3); hyper judges anything else.
fn rewrite(line: &mut [u8]) -> LineVersion {
    let line = match line {
        [rest @ .., b'\r'] => rest,
        line => line,
    };
    let Some(at) = line.len().checked_sub(8).filter(|&at| at > 0) else {
        return LineVersion::Http1;
    };
    if line[at - 1] != b' ' {
        return LineVersion::Http1;
    }
    let asked = match line[at..] {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'2'..=b'9'] => LineVersion::LaterMinor,
        [b'H', b'T', b'T', b'P', b'/', b'2'..=b'9', b'.', b'0'..=b'9'] => {
            if line == b"PRI * HTTP/2.0" {
                LineVersion::H2Preface
            } else {
                LineVersion::OtherMajor
            }
        }
        _ => return LineVersion::Http1,
    };
    line[at..].copy_from_slice(b"HTTP/1.1");
    asked
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn rewritten(line: &str) -> (LineVersion, String) {
        let mut bytes = line.as_bytes().to_vec();
        let asked = rewrite(&mut bytes);
        (asked, String::from_utf8(bytes).unwrap())
    }

    #[test]
    fn versions_hyper_refuses_become_1_1() {
        use LineVersion::*;
        for (line, asked, after) in [
            ("GET / HTTP/1.1\r", Http1, "GET / HTTP/1.1\r"),
            ("GET / HTTP/1.0", Http1, "GET / HTTP/1.0"),
            ("GET / HTTP/1.2\r", LaterMinor, "GET / HTTP/1.1\r"),
            ("HEAD /x HTTP/1.9", LaterMinor, "HEAD /x HTTP/1.1"),
            ("GET / HTTP/2.0\r", OtherMajor, "GET / HTTP/1.1\r"),
            ("GET / HTTP/3.0", OtherMajor, "GET / HTTP/1.1"),
            ("GET / HTTP/9.9", OtherMajor, "GET / HTTP/1.1"),
            ("PRI * HTTP/2.0\r", H2Preface, "PRI * HTTP/1.1\r"),
            ("PRI / HTTP/2.0", OtherMajor, "PRI / HTTP/1.1"),
            // Left to hyper: not `DIGIT "." DIGIT`, no space before it, or no version.
            ("GET / HTTP/0.9", Http1, "GET / HTTP/0.9"),
            ("GET / HTTP/1.10", Http1, "GET / HTTP/1.10"),
            ("GET / HTTP/12.0", Http1, "GET / HTTP/12.0"),
            ("GET / http/1.2", Http1, "GET / http/1.2"),
            ("GET / HTTP/1.2 ", Http1, "GET / HTTP/1.2 "),
            ("GET /HTTP/1.2", Http1, "GET /HTTP/1.2"),
            ("HTTP/1.2", Http1, "HTTP/1.2"),
            (" HTTP/2.0", OtherMajor, " HTTP/1.1"),
            ("GET /", Http1, "GET /"),
            ("", Http1, ""),
        ] {
            assert_eq!(rewritten(line), (asked, after.to_owned()), "{line:?}");
        }
    }

    #[test]
    fn the_line_starts_after_empty_lines() {
        let bytes = b"\r\n\nGET / HTTP/1.2\r\nHost: t\r\n\r\n";
        let mut start = 0;
        let end = line_end(bytes, &mut start, 0).unwrap();
        assert_eq!(&bytes[start..end], b"GET / HTTP/1.2\r");
        let mut start = 0;
        assert_eq!(line_end(b"\r\nGET / HT", &mut start, 0), None);
        assert_eq!(start, 2);
    }

    /// Reads everything `client` sends through a `FirstLine`, with a read buffer of
    /// `capacity` bytes, and returns it with what the line asked for.
    async fn through(writes: &[&[u8]], capacity: usize) -> (Vec<u8>, Vec<LineVersion>) {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let writes: Vec<Vec<u8>> = writes.iter().map(|w| w.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for w in writes {
                client.write_all(&w).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut line = FirstLine::default();
        let mut asked = Vec::new();
        let mut out = Vec::new();
        let mut storage = vec![0u8; capacity];
        loop {
            let mut buf = ReadBuf::new(&mut storage);
            std::future::poll_fn(|cx| line.poll_read(&mut server, cx, &mut buf, |v| asked.push(v)))
                .await
                .unwrap();
            if buf.filled().is_empty() {
                break;
            }
            out.extend_from_slice(buf.filled());
        }
        writer.await.unwrap();
        (out, asked)
    }

    #[tokio::test]
    async fn a_line_in_one_read_is_rewritten_in_place() {
        let (out, asked) = through(&[b"GET / HTTP/1.2\r\nHost: t\r\n\r\n"], 8192).await;
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(asked, [LineVersion::LaterMinor]);
    }

    #[tokio::test]
    async fn a_line_sent_a_byte_at_a_time_is_held_until_its_end() {
        for (request, expected, version) in [
            (
                &b"GET / HTTP/1.2\r\nHost: t\r\n\r\n"[..],
                &b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"[..],
                LineVersion::LaterMinor,
            ),
            (
                b"\r\nGET / HTTP/2.0\r\n\r\n",
                b"\r\nGET / HTTP/1.1\r\n\r\n",
                LineVersion::OtherMajor,
            ),
            (
                b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.2\r\n\r\n",
                b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.2\r\n\r\n",
                LineVersion::Http1,
            ),
        ] {
            let bytes: Vec<&[u8]> = request.chunks(1).collect();
            // A reader with less room than the held line gets it over several reads.
            for capacity in [4, 8192] {
                let (out, asked) = through(&bytes, capacity).await;
                assert_eq!(out, expected, "{request:?}");
                assert_eq!(asked, [version], "{request:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_line_without_an_end_goes_on_untouched() {
        let long = format!("GET /{} HTTP/1.2\r\n\r\n", "a".repeat(MAX_LINE_BYTES));
        let bytes: Vec<&[u8]> = long.as_bytes().chunks(1000).collect();
        let (out, asked) = through(&bytes, 8192).await;
        assert_eq!(out, long.as_bytes());
        assert!(asked.is_empty());
        // Nor does a client that closes before the end lose what it sent.
        let (out, asked) = through(&[b"GET / HT"], 8192).await;
        assert_eq!(out, b"GET / HT");
        assert!(asked.is_empty());
    }

    #[tokio::test]
    async fn later_lines_pass_through() {
        let mut line = FirstLine::default();
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut storage = [0u8; 64];
        for (sent, asked) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], vec![LineVersion::Http1]),
            (b"GET / HTTP/2.0\r\n\r\n", vec![]),
        ] {
            client.write_all(sent).await.unwrap();
            let mut heard = Vec::new();
            let mut buf = ReadBuf::new(&mut storage);
            std::future::poll_fn(|cx| line.poll_read(&mut server, cx, &mut buf, |v| heard.push(v)))
                .await
                .unwrap();
            assert_eq!(buf.filled(), sent);
            assert_eq!(heard, asked);
        }
        assert!(matches!(line.state, State::Done));
    }
}
