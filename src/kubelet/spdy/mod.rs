//! The server side of SPDY/3.1 as Kubernetes uses it for streaming (`exec`, `attach`): the API
//! server dials a kubelet with SPDY when it translates a client's WebSocket session
//! (`TranslateStreamsToWebsockets`, on by default since v1.30), so a kubelet that does not speak
//! SPDY cannot be exec'ed into through a real API server.
//!
//! Only what a kubelet needs: the client opens every stream (`SYN_STREAM`, odd ids) with a
//! `streamtype` header, the server answers each with `SYN_REPLY`, both sides send `DATA` and
//! half-close with `FIN`; `PING` is echoed, `GOAWAY` ends the connection. Name/value header
//! blocks are zlib streams (one per direction and connection) primed with the SPDY/3 dictionary.
//! No flow control is enforced, as in the Go implementation Kubernetes uses (moby/spdystream).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00, section 2.6.10.1).
const DICTIONARY: &[u8] = include_bytes!("dictionary.bin");

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 0x01;
/// Larger frames are refused (header blocks and data are small in this protocol's use).
const MAX_FRAME: usize = 1 << 20;
/// Outgoing data is cut into frames of at most this size.
const DATA_CHUNK: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("spdy: {0}")]
    Io(#[from] std::io::Error),
    #[error("spdy: {0}")]
    Protocol(String),
}

fn protocol(message: impl Into<String>) -> Error {
    Error::Protocol(message.into())
}

/// What the client did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A new stream, with its headers (names lowercase, as SPDY/3 requires).
    Open {
        id: u32,
        headers: Vec<(String, String)>,
        fin: bool,
    },
    Data {
        id: u32,
        data: Vec<u8>,
        fin: bool,
    },
    Reset {
        id: u32,
    },
    /// A ping to echo (see [`Writer::pong`]).
    Ping {
        id: u32,
    },
    GoAway,
}

/// Reads the client's frames.
pub struct Reader<R> {
    io: R,
    inflate: Decompress,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R) -> Self {
        Reader {
            io,
            inflate: Decompress::new(true),
        }
    }

    /// The next frame the caller has to know about (settings, window updates and replies are
    /// consumed here); `None` when the client closed the connection.
    pub async fn next(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            let mut head = [0u8; 8];
            match self.io.read_exact(&mut head).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            let flags = head[4];
            let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
            if length > MAX_FRAME {
                return Err(protocol(format!("a frame of {length} bytes")));
            }
            let mut payload = vec![0u8; length];
            self.io.read_exact(&mut payload).await?;
            let fin = flags & FLAG_FIN != 0;
            if head[0] & 0x80 == 0 {
                let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                return Ok(Some(Frame::Data {
                    id,
                    data: payload,
                    fin,
                }));
            }
            let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
            if version != VERSION {
                return Err(protocol(format!("version {version}, not 3")));
            }
            let kind = u16::from_be_bytes([head[2], head[3]]);
            let word = |at: usize| -> Result<u32, Error> {
                payload
                    .get(at..at + 4)
                    .map(|b| u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]))
                    .ok_or_else(|| protocol(format!("a short control frame of type {kind}")))
            };
            match kind {
                SYN_STREAM => {
                    let id = word(0)?;
                    let block = payload.get(10..).unwrap_or_default();
                    let headers = self.headers(block)?;
                    return Ok(Some(Frame::Open { id, headers, fin }));
                }
                // The block must be inflated even when unused: the zlib stream spans frames.
                HEADERS => {
                    self.headers(payload.get(4..).unwrap_or_default())?;
                }
                RST_STREAM => return Ok(Some(Frame::Reset { id: word(0)? })),
                PING => return Ok(Some(Frame::Ping { id: word(0)? })),
                GOAWAY => return Ok(Some(Frame::GoAway)),
                // SYN_REPLY (the server opens no streams), SETTINGS, WINDOW_UPDATE, others.
                _ => {}
            }
        }
    }

    /// Inflates a name/value header block.
    fn headers(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, Error> {
        let mut out = Vec::new();
        let mut input = block;
        while !input.is_empty() {
            out.reserve(4 * input.len() + 256);
            let before = self.inflate.total_in();
            let result = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - before) as usize;
            input = &input[used..];
            match result {
                Ok(Status::StreamEnd) => break,
                Ok(_) if used == 0 && out.len() < out.capacity() => {
                    return Err(protocol("a header block that does not inflate"));
                }
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| protocol(format!("header dictionary: {e}")))?;
                }
                Err(e) => return Err(protocol(format!("header block: {e}"))),
            }
        }
        parse_headers(&out)
    }
}

fn parse_headers(block: &[u8]) -> Result<Vec<(String, String)>, Error> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], Error> {
        let slice = block
            .get(at..at + n)
            .ok_or_else(|| protocol("a truncated header block"))?;
        at += n;
        Ok(slice)
    };
    let number = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let count = number(take(4)?);
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let length = number(take(4)?);
        let name = String::from_utf8_lossy(take(length)?).to_lowercase();
        let length = number(take(4)?);
        // Several values of one name are separated by NUL.
        let values = String::from_utf8_lossy(take(length)?).into_owned();
        for value in values.split('\0') {
            headers.push((name.clone(), value.to_string()));
        }
    }
    Ok(headers)
}

/// A frame on the wire: its first word (a control frame's version and type, or a data frame's
/// stream id), flags, the 24-bit length, the payload.
fn frame(first: [u8; 4], flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&first);
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

fn control_word(kind: u16) -> [u8; 4] {
    let [a, b] = (0x8000 | VERSION).to_be_bytes();
    let [c, d] = kind.to_be_bytes();
    [a, b, c, d]
}

/// Writes the server's frames.
pub struct Writer<W> {
    io: W,
    deflate: Compress,
    primed: bool,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(io: W) -> Self {
        Writer {
            io,
            deflate: Compress::new(Compression::default(), true),
            primed: false,
        }
    }

    async fn control(&mut self, kind: u16, flags: u8, payload: &[u8]) -> Result<(), Error> {
        self.io
            .write_all(&frame(control_word(kind), flags, payload))
            .await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Accepts a stream the client opened (no headers).
    pub async fn reply(&mut self, id: u32) -> Result<(), Error> {
        if !self.primed {
            self.deflate
                .set_dictionary(DICTIONARY)
                .map_err(|e| protocol(format!("header dictionary: {e}")))?;
            self.primed = true;
        }
        let mut block = Vec::with_capacity(64);
        self.deflate
            .compress_vec(&0u32.to_be_bytes(), &mut block, FlushCompress::Sync)
            .map_err(|e| protocol(format!("header block: {e}")))?;
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend_from_slice(&block);
        self.control(SYN_REPLY, 0, &payload).await
    }

    /// Data on a stream; `fin` half-closes it (an empty `data` with `fin` only closes).
    pub async fn data(&mut self, id: u32, data: &[u8], fin: bool) -> Result<(), Error> {
        let mut chunks: Vec<&[u8]> = data.chunks(DATA_CHUNK).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let flags = if fin && i == last { FLAG_FIN } else { 0 };
            self.io.write_all(&frame(id.to_be_bytes(), flags, chunk)).await?;
        }
        self.io.flush().await?;
        Ok(())
    }

    pub async fn pong(&mut self, id: u32) -> Result<(), Error> {
        self.control(PING, 0, &id.to_be_bytes()).await
    }

    /// Aborts a stream (status 5: CANCEL).
    pub async fn reset(&mut self, id: u32) -> Result<(), Error> {
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend_from_slice(&5u32.to_be_bytes());
        self.control(RST_STREAM, 0, &payload).await
    }

    /// Ends the connection: no new streams after `last_stream`.
    pub async fn go_away(&mut self, last_stream: u32) -> Result<(), Error> {
        let mut payload = last_stream.to_be_bytes().to_vec();
        payload.extend_from_slice(&0u32.to_be_bytes());
        self.control(GOAWAY, 0, &payload).await
    }

    pub async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's frames, as moby/spdystream's framer writes them (checked against the Go
    /// implementation end to end by make e2e: kubectl exec through a real API server).
    struct Client {
        deflate: Compress,
        inflate: Decompress,
    }

    impl Client {
        fn new() -> Self {
            let mut deflate = Compress::new(Compression::default(), true);
            deflate.set_dictionary(DICTIONARY).unwrap();
            Client {
                deflate,
                inflate: Decompress::new(true),
            }
        }

        fn syn_stream(&mut self, id: u32, headers: &[(&str, &str)], fin: bool) -> Vec<u8> {
            let mut block = (headers.len() as u32).to_be_bytes().to_vec();
            for (name, value) in headers {
                block.extend_from_slice(&(name.len() as u32).to_be_bytes());
                block.extend_from_slice(name.as_bytes());
                block.extend_from_slice(&(value.len() as u32).to_be_bytes());
                block.extend_from_slice(value.as_bytes());
            }
            let mut compressed = Vec::with_capacity(block.len() + 64);
            self.deflate
                .compress_vec(&block, &mut compressed, FlushCompress::Sync)
                .unwrap();
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            payload.extend_from_slice(&compressed);
            frame([0x80, 3, 0, 1], u8::from(fin), &payload)
        }
    }

    fn data(id: u32, bytes: &[u8], fin: bool) -> Vec<u8> {
        frame(id.to_be_bytes(), u8::from(fin), bytes)
    }

    #[tokio::test]
    async fn streams_headers_data_and_pings_are_read() {
        let mut client = Client::new();
        let mut wire = Vec::new();
        wire.extend(client.syn_stream(1, &[("streamtype", "error")], false));
        wire.extend(client.syn_stream(3, &[("streamType", "stdin"), ("x", "a\0b")], false));
        wire.extend(data(3, b"hello", false));
        wire.extend(data(3, b"", true));
        wire.extend([0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 9]);
        wire.extend([0x80, 3, 0, 4, 0, 0, 0, 4, 0, 0, 0, 0]); // SETTINGS: skipped
        wire.extend([0x80, 3, 0, 7, 0, 0, 0, 8, 0, 0, 0, 3, 0, 0, 0, 0]);
        let mut reader = Reader::new(wire.as_slice());
        let mut frames = Vec::new();
        while let Some(frame) = reader.next().await.unwrap() {
            frames.push(frame);
        }
        let headers = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            frames,
            vec![
                Frame::Open {
                    id: 1,
                    headers: headers(&[("streamtype", "error")]),
                    fin: false
                },
                Frame::Open {
                    id: 3,
                    headers: headers(&[("streamtype", "stdin"), ("x", "a"), ("x", "b")]),
                    fin: false
                },
                Frame::Data {
                    id: 3,
                    data: b"hello".to_vec(),
                    fin: false
                },
                Frame::Data {
                    id: 3,
                    data: vec![],
                    fin: true
                },
                Frame::Ping { id: 9 },
                Frame::GoAway,
            ]
        );
    }

    #[tokio::test]
    async fn replies_inflate_with_the_dictionary_and_data_is_framed() {
        let mut wire = Vec::new();
        let mut writer = Writer::new(&mut wire);
        writer.reply(1).await.unwrap();
        writer.reply(3).await.unwrap();
        writer.data(3, &vec![7u8; DATA_CHUNK + 1], true).await.unwrap();
        writer.go_away(3).await.unwrap();
        // Two SYN_REPLYs whose header blocks a client inflates (one zlib stream) to zero pairs.
        let mut client = Client::new();
        let mut at = 0;
        for id in [1u32, 3] {
            assert_eq!(&wire[at..at + 4], &[0x80, 3, 0, 2]);
            let length = u32::from_be_bytes([0, wire[at + 5], wire[at + 6], wire[at + 7]]) as usize;
            let payload = &wire[at + 8..at + 8 + length];
            assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), id);
            let mut out = Vec::with_capacity(64);
            let result = client
                .inflate
                .decompress_vec(&payload[4..], &mut out, FlushDecompress::Sync);
            if let Err(e) = result {
                assert!(e.needs_dictionary().is_some(), "{e}");
                client.inflate.set_dictionary(DICTIONARY).unwrap();
                let consumed = client.inflate.total_in() as usize;
                client
                    .inflate
                    .decompress_vec(&payload[4 + consumed..], &mut out, FlushDecompress::Sync)
                    .unwrap();
            }
            assert_eq!(out, 0u32.to_be_bytes());
            at += 8 + length;
        }
        // The data: a full chunk, then one byte with FIN.
        assert_eq!(&wire[at..at + 8], &[0, 0, 0, 3, 0, 0, 0x80, 0]);
        at += 8 + DATA_CHUNK;
        assert_eq!(&wire[at..at + 9], &[0, 0, 0, 3, FLAG_FIN, 0, 0, 1, 7]);
        at += 9;
        assert_eq!(&wire[at..], &[0x80, 3, 0, 7, 0, 0, 0, 8, 0, 0, 0, 3, 0, 0, 0, 0]);
    }
}
