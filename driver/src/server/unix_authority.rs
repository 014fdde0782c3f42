//! Accept any HTTP/2 `:authority` on the unix socket.
//!
//! gRPC C-core clients (Python `grpcio`, C++, Ruby) dialing `unix:///run/x.sock` send the
//! percent-encoded socket path as `:authority` (grpc/grpc#38142). The `http` crate's
//! `Authority` parser refuses a `%` outside an IPv6 zone, and h2 answers every such request
//! with `RST_STREAM(PROTOCOL_ERROR)` (hyperium/h2#487) before tonic sees it; neither h2 nor
//! tonic has a setting for it. On a unix socket the authority names nothing, so this layer sits
//! between the accepted socket and the server and replaces an authority the server would refuse
//! with `localhost`, the value grpc-go clients send.
//!
//! Written by hand because no crate does it: it parses only HTTP/2 frame headers from the client,
//! copies every frame but HEADERS/CONTINUATION through untouched (DATA is not buffered), and
//! re-encodes header blocks with `loona-hpack`, keeping one decoder (the client's compression
//! context) and one encoder (the server's) per connection. Server-to-client bytes pass through.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer must accept (SETTINGS_MAX_FRAME_SIZE's floor).
const MAX_OUT_FRAME: usize = 16_384;
/// Larger header frames than a server could have allowed mean we misread the stream.
const MAX_IN_FRAME: usize = 1 << 24;
/// The authority clients like grpc-go send on unix sockets.
const REPLACEMENT: &[u8] = b"localhost";

/// A client connection whose header blocks are rewritten on the way in.
pub struct AuthorityFix<S> {
    inner: S,
    /// Client bytes read but not yet examined.
    raw: BytesMut,
    /// Examined bytes ready for the server.
    out: BytesMut,
    preface_left: usize,
    /// Payload bytes of the current non-header frame still to copy through as they come.
    passthrough: usize,
    /// A header block collected across HEADERS and CONTINUATION frames.
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Not HTTP/2 as we understand it: copy everything and let the server decide.
    bypass: bool,
    eof: bool,
}

struct Pending {
    stream_id: u32,
    end_stream: bool,
    block: Vec<u8>,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            preface_left: PREFACE.len(),
            passthrough: 0,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            bypass: false,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Move whatever is complete from `raw` to `out`.
    fn process(&mut self) {
        loop {
            if self.bypass {
                let rest = self.raw.split();
                self.out.extend_from_slice(&rest);
                return;
            }
            if self.preface_left > 0 {
                let n = self.preface_left.min(self.raw.len());
                let seen = PREFACE.len() - self.preface_left;
                if self.raw[..n] != PREFACE[seen..seen + n] {
                    self.bypass = true;
                    continue;
                }
                self.move_out(n);
                self.preface_left -= n;
                if self.preface_left > 0 {
                    return;
                }
            }
            if self.passthrough > 0 {
                let n = self.passthrough.min(self.raw.len());
                self.move_out(n);
                self.passthrough -= n;
                if self.passthrough > 0 {
                    return;
                }
            }
            if self.raw.len() < FRAME_HEADER {
                return;
            }
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            let kind = self.raw[3];
            if kind != HEADERS && kind != CONTINUATION {
                if self.pending.is_some() {
                    // Only CONTINUATION may follow an unfinished block: a protocol error the
                    // server reports once it sees the original bytes.
                    self.give_up();
                    continue;
                }
                self.move_out(FRAME_HEADER);
                self.passthrough = len;
                continue;
            }
            if len > MAX_IN_FRAME {
                self.give_up();
                continue;
            }
            if self.raw.len() < FRAME_HEADER + len {
                return;
            }
            let frame = self.raw.split_to(FRAME_HEADER + len);
            if !self.header_frame(&frame) {
                // Undecodable: hand the server what the client sent and stop rewriting.
                self.out.extend_from_slice(&frame);
                self.give_up();
            }
        }
    }

    fn move_out(&mut self, n: usize) {
        let chunk = self.raw.split_to(n);
        self.out.extend_from_slice(&chunk);
    }

    /// Stop rewriting; an unfinished block goes out as the client framed it would be lost, so
    /// the connection is left to fail on the server's side.
    fn give_up(&mut self) {
        self.pending = None;
        self.bypass = true;
    }

    /// One HEADERS or CONTINUATION frame; false if it cannot be understood.
    fn header_frame(&mut self, frame: &[u8]) -> bool {
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let mut payload = &frame[FRAME_HEADER..];
        if kind == HEADERS {
            if self.pending.is_some() {
                return false;
            }
            let mut pad = 0;
            if flags & PADDED != 0 {
                let Some((&p, rest)) = payload.split_first() else {
                    return false;
                };
                pad = p as usize;
                payload = rest;
            }
            if flags & PRIORITY != 0 {
                // Stream dependency and weight: advisory, and dropped.
                let Some(rest) = payload.get(5..) else {
                    return false;
                };
                payload = rest;
            }
            let Some(fragment) = payload.len().checked_sub(pad).map(|n| &payload[..n]) else {
                return false;
            };
            self.pending = Some(Pending {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                block: fragment.to_vec(),
            });
        } else {
            match &mut self.pending {
                Some(p) if p.stream_id == stream_id => p.block.extend_from_slice(payload),
                _ => return false,
            }
        }
        if flags & END_HEADERS == 0 {
            return true;
        }
        let p = self.pending.take().expect("set above");
        let Ok(mut headers) = self.decoder.decode(&p.block) else {
            return false;
        };
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority" && !acceptable(value) {
                *value = REPLACEMENT.to_vec();
            }
        }
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        self.emit(p.stream_id, p.end_stream, &block);
        true
    }

    /// Frame `block` as HEADERS plus CONTINUATIONs no larger than any server accepts.
    fn emit(&mut self, stream_id: u32, end_stream: bool, block: &[u8]) {
        let mut chunks = block.chunks(MAX_OUT_FRAME);
        let mut first = true;
        // An empty block still needs its HEADERS frame.
        let empty: &[u8] = &[];
        let mut next = chunks.next().or(Some(empty));
        while let Some(chunk) = next {
            next = chunks.next();
            let mut flags = 0;
            if first && end_stream {
                flags |= END_STREAM;
            }
            if next.is_none() {
                flags |= END_HEADERS;
            }
            let kind = if first { HEADERS } else { CONTINUATION };
            let len = (chunk.len() as u32).to_be_bytes();
            self.out
                .extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
            self.out.extend_from_slice(&stream_id.to_be_bytes());
            self.out.extend_from_slice(chunk);
            first = false;
        }
    }
}

/// Would the server's `http::uri::Authority` parser take this value?
fn acceptable(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // DATA payloads and a bypassed stream go straight into the server's buffer.
            let direct = if this.bypass {
                Some(buf.remaining())
            } else if this.raw.is_empty() && this.passthrough > 0 {
                Some(this.passthrough.min(buf.remaining()))
            } else {
                None
            };
            if let Some(limit) = direct {
                let mut sub = buf.take(limit);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut sub))?;
                let n = sub.filled().len();
                // SAFETY: `sub` was carved from `buf`'s unfilled part and the inner reader
                // initialised and filled its first `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                if !this.bypass {
                    this.passthrough -= n;
                }
                return Poll::Ready(Ok(()));
            }
            this.raw.reserve(MAX_OUT_FRAME);
            let spare = this.raw.spare_capacity_mut();
            let mut rb = ReadBuf::uninit(spare);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // The client closed: whatever is left goes out as it came.
                this.eof = true;
                let rest = this.raw.split();
                this.out.extend_from_slice(&rest);
                continue;
            }
            // SAFETY: the inner reader initialised `n` bytes of the spare capacity.
            unsafe { this.raw.set_len(this.raw.len() + n) };
            this.process();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Run `client_bytes` through the layer and decode what the server would see.
    async fn through(client_bytes: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        tokio::io::AsyncWriteExt::write_all(&mut client, &client_bytes)
            .await
            .unwrap();
        drop(client);
        let mut fix = AuthorityFix::new(server);
        let mut seen = Vec::new();
        fix.read_to_end(&mut seen).await.unwrap();
        seen
    }

    /// Split what the server sees into (kind, flags, stream, payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(b.starts_with(PREFACE));
        b = &b[PREFACE.len()..];
        let mut out = Vec::new();
        while !b.is_empty() {
            let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            out.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        out
    }

    fn request(authority: &[u8]) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/csi.v1.Identity/GetPluginInfo".to_vec()),
            (b":authority", authority.to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"te", b"trailers".to_vec()),
        ]
    }

    #[tokio::test]
    async fn percent_encoded_authority_becomes_localhost_and_the_rest_survives() {
        let mut enc = loona_hpack::Encoder::new();
        let path = b"%2Frun%2Floopvol%2Fcsi.sock";
        let first = enc.encode(request(path).iter().map(|(n, v)| (*n, v.as_slice())));
        // The second request reuses the client's dynamic table (indexed fields).
        let second = enc.encode(request(path).iter().map(|(n, v)| (*n, v.as_slice())));
        let body = b"\0\0\0\0\x05hello".to_vec();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &first));
        bytes.extend(frame(0x0, END_STREAM, 1, &body)); // DATA
                                                        // A padded, prioritised HEADERS split over a CONTINUATION, ending the stream.
        let (a, b) = second.split_at(second.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(&[0, 0, 0, 0, 16]);
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        bytes.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &padded));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 3, b));

        let seen = frames(&through(bytes).await);
        let mut dec = loona_hpack::Decoder::new();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0].0, 0x4);
        for (i, stream, end_stream) in [(1usize, 1u32, 0u8), (3, 3, END_STREAM)] {
            let (kind, flags, s, block) = &seen[i];
            assert_eq!((*kind, *s), (HEADERS, stream));
            assert_eq!(*flags, END_HEADERS | end_stream);
            let headers = dec.decode(block).unwrap();
            let want: Vec<(Vec<u8>, Vec<u8>)> = request(b"localhost")
                .into_iter()
                .map(|(n, v)| (n.to_vec(), v))
                .collect();
            assert_eq!(headers, want);
        }
        assert_eq!(seen[2], (0x0, END_STREAM, 1, body));
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(
            request(b"localhost:50051")
                .iter()
                .map(|(n, v)| (*n, v.as_slice())),
        );
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
        let seen = frames(&through(bytes).await);
        let headers = loona_hpack::Decoder::new().decode(&seen[0].3).unwrap();
        assert!(headers.contains(&(b":authority".to_vec(), b"localhost:50051".to_vec())));
    }

    #[tokio::test]
    async fn large_header_blocks_are_split_into_continuations() {
        let mut enc = loona_hpack::Encoder::new();
        let big = vec![b'x'; 40_000];
        let mut req = request(b"%2Fs.sock");
        req.push((b"x-big", big.clone()));
        let block = enc.encode(req.iter().map(|(n, v)| (*n, v.as_slice())));
        let mut bytes = PREFACE.to_vec();
        // As a client allowed a larger max frame size might send it.
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let seen = frames(&through(bytes).await);
        assert!(seen.len() >= 3);
        assert!(seen.iter().all(|f| f.3.len() <= MAX_OUT_FRAME));
        assert_eq!(seen[0].0, HEADERS);
        assert!(seen[1..].iter().all(|f| f.0 == CONTINUATION));
        assert_eq!(seen.last().unwrap().1, END_HEADERS);
        let joined: Vec<u8> = seen.iter().flat_map(|f| f.3.clone()).collect();
        let headers = loona_hpack::Decoder::new().decode(&joined).unwrap();
        assert!(headers.contains(&(b"x-big".to_vec(), big)));
        assert!(headers.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
    }

    #[tokio::test]
    async fn what_is_not_http2_passes_through_unchanged() {
        let bytes = b"GET / HTTP/1.1\r\nHost: %2Fx\r\n\r\n".to_vec();
        assert_eq!(through(bytes.clone()).await, bytes);
    }
}
