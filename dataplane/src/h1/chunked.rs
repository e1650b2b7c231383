//! The chunked transfer coding (RFC 9112 section 7.1): a strict decoder for upstream answers
//! and the framing fleetlb writes around a streamed request body.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWrite;

/// One decoding step of a chunked body.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    Data(Bytes),
    End,
}

/// Chunked transfer-coding decoder (RFC 9112 section 7.1), strict: CRLF line ends, hex sizes
/// that fit 64 bits, bounded size lines and trailers.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: ChunkState,
    trailer_bytes: usize,
}

#[derive(Debug, Default)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Longest chunk-size line (size plus extensions).
const MAX_SIZE_LINE: usize = 4096;
/// Most trailer bytes.
const MAX_TRAILERS: usize = 16 * 1024;

impl Chunked {
    /// Consumes what it can from `buf`: `Ok(None)` means more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Step>, &'static str> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(eol) = find_crlf(buf)? else {
                        return if buf.len() > MAX_SIZE_LINE {
                            Err("chunk size line too long")
                        } else {
                            Ok(None)
                        };
                    };
                    let line = &buf[..eol];
                    let digits = line
                        .iter()
                        .position(|b| !b.is_ascii_hexdigit())
                        .unwrap_or(line.len());
                    if digits == 0 || digits > 16 {
                        return Err("bad chunk size");
                    }
                    match line[digits..].first() {
                        None | Some(b';') => {}
                        Some(b' ' | b'\t') if line[digits..].trim_ascii().starts_with(b";") => {}
                        Some(_) => return Err("bad chunk size"),
                    }
                    let size = line[..digits].iter().fold(0u64, |n, &b| {
                        (n << 4) | u64::from((b as char).to_digit(16).unwrap_or(0))
                    });
                    buf.advance(eol + 2);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = left.min(buf.len() as u64) as usize;
                    let data = buf.split_to(n).freeze();
                    self.state = if left == n as u64 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                    return Ok(Some(Step::Data(data)));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk not followed by CRLF");
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(eol) = find_crlf(buf)? else {
                        return if self.trailer_bytes + buf.len() > MAX_TRAILERS {
                            Err("trailers too long")
                        } else {
                            Ok(None)
                        };
                    };
                    self.trailer_bytes += eol + 2;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err("trailers too long");
                    }
                    buf.advance(eol + 2);
                    if eol == 0 {
                        self.state = ChunkState::Done;
                        return Ok(Some(Step::End));
                    }
                }
                ChunkState::Done => return Ok(Some(Step::End)),
            }
        }
    }
}

/// Where the first line ends (its CR), if the line is complete; a bare LF is an error.
fn find_crlf(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    match buf.iter().position(|&b| b == b'\n') {
        None => Ok(None),
        Some(lf) if lf > 0 && buf[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err("bare LF in chunked framing"),
    }
}

/// The line that opens a chunk of `len` bytes: its size in hex and CRLF.
fn chunk_head(len: usize) -> Bytes {
    Bytes::from(format!("{len:x}\r\n"))
}

/// Bytes waiting to go out in order (a head, chunk framing, body data), written one vectored
/// write at a time: a body streamed through fleetlb, upstream (a request body) or to a client
/// (a response).
#[derive(Default)]
pub(crate) struct Outgoing(VecDeque<Bytes>);

impl Outgoing {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn push_front(&mut self, b: Bytes) {
        self.0.push_front(b);
    }

    pub fn push_back(&mut self, b: Bytes) {
        self.0.push_back(b);
    }

    /// `data` as it goes on the wire: framed as a chunk when `chunked`.
    pub fn push_data(&mut self, data: Bytes, chunked: bool) {
        if chunked {
            self.0.push_back(chunk_head(data.len()));
            self.0.push_back(data);
            self.0.push_back(Bytes::from_static(b"\r\n"));
        } else {
            self.0.push_back(data);
        }
    }

    /// The end of a chunked body (no trailers).
    pub fn push_last_chunk(&mut self) {
        self.0.push_back(Bytes::from_static(b"0\r\n\r\n"));
    }

    /// Writes what `io` takes of the front in one vectored write; `Ready(Ok)` once some went.
    pub fn poll_write<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut W,
    ) -> Poll<io::Result<()>> {
        let slices: [io::IoSlice<'_>; 4] =
            std::array::from_fn(|i| io::IoSlice::new(self.0.get(i).map_or(&[][..], |b| &b[..])));
        let mut n = ready!(Pin::new(io).poll_write_vectored(cx, &slices))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        while n > 0 {
            let Some(front) = self.0.front_mut() else {
                break;
            };
            let k = n.min(front.len());
            front.advance(k);
            n -= k;
            if front.is_empty() {
                self.0.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), &'static str> {
        let mut dec = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(s) = dec.decode(&mut buf)? {
                match s {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::End => return Ok((out, true)),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..wire.len() {
            let (body, done) = decode_all(wire, step).unwrap();
            assert_eq!(body, b"hello 0123456789", "read size {step}");
            assert!(done);
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for wire in [
            &b"z\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\n",
        ] {
            assert!(decode_all(wire, wire.len()).is_err(), "{wire:?}");
        }
        let long = vec![b'1'; MAX_SIZE_LINE + 10];
        assert!(decode_all(&long, long.len()).is_err());
    }
}
