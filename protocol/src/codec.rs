//! The one codec: compact binary (postcard) and readable JSON, chosen by media type.
//!
//! Every message is framed with the protocol version:
//! - postcard: the version as a varint, then the message;
//! - JSON: `{"protocol": 1, "message": …}`.
//!
//! Decoding checks the size limit before reading anything, checks the version before the
//! message, and turns every malformed, truncated or hostile input into a [`CodecError`].

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;

/// Media type of the compact binary encoding.
pub const POSTCARD_MEDIA_TYPE: &str = "application/x-ferry+postcard";
/// Media type of the JSON encoding.
pub const JSON_MEDIA_TYPE: &str = "application/json";

/// The zstd level both sides compress messages with: the fastest. Ferry's messages are rows of
/// repeated shapes, which level 1 already shrinks about fourfold; higher levels cost more CPU on
/// both sides than the few bytes they save are worth on a sync's critical path.
pub const ZSTD_LEVEL: i32 = 1;

/// Default upper bound on an encoded message, in bytes (16 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A wire encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// postcard: compact, not self-describing, frozen wire format for postcard 1.x.
    Postcard,
    /// JSON: readable, for debugging and for clients without a postcard library.
    Json,
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The body is larger than the limit; nothing was decoded.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the body.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The message was framed with another protocol version.
    #[error("protocol version {got} is not supported (this side speaks {expected})")]
    VersionMismatch {
        /// The version the peer sent.
        got: u64,
        /// The version this side speaks.
        expected: u16,
    },
    /// The bytes are not a valid message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The media type names no Ferry encoding.
    #[error("unsupported media type {0:?}; use {POSTCARD_MEDIA_TYPE} or {JSON_MEDIA_TYPE}")]
    UnsupportedMediaType(String),
    /// The message could not be encoded (e.g. a non-finite float in JSON).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

impl Encoding {
    /// The media type to put in `Content-Type`.
    pub fn media_type(self) -> &'static str {
        match self {
            Encoding::Postcard => POSTCARD_MEDIA_TYPE,
            Encoding::Json => JSON_MEDIA_TYPE,
        }
    }

    /// The encoding named by a `Content-Type` header value (parameters such as `charset` are ignored).
    pub fn from_content_type(value: &str) -> Result<Self, CodecError> {
        let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            POSTCARD_MEDIA_TYPE => Ok(Encoding::Postcard),
            JSON_MEDIA_TYPE => Ok(Encoding::Json),
            _ => Err(CodecError::UnsupportedMediaType(value.to_string())),
        }
    }

    /// The encoding to answer with, from an `Accept` header value. No header, `*/*` and
    /// `application/*` mean JSON; the first listed Ferry encoding wins; otherwise an error.
    pub fn from_accept(value: Option<&str>) -> Result<Self, CodecError> {
        let Some(value) = value else { return Ok(Encoding::Json) };
        if value.trim().is_empty() {
            return Ok(Encoding::Json);
        }
        for part in value.split(',') {
            let essence = part.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            match essence.as_str() {
                POSTCARD_MEDIA_TYPE => return Ok(Encoding::Postcard),
                JSON_MEDIA_TYPE | "*/*" | "application/*" => return Ok(Encoding::Json),
                _ => {}
            }
        }
        Err(CodecError::UnsupportedMediaType(value.to_string()))
    }

    /// Encodes a message, framed with [`PROTOCOL_VERSION`].
    pub fn encode<T: Serialize>(self, message: &T) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        self.encode_into(message, &mut out)?;
        Ok(out)
    }

    /// Encodes a message as [`Encoding::encode`] does, appending it to `out` (a buffer reused
    /// from message to message keeps its room). On an error `out` may hold part of it.
    pub fn encode_into<T: Serialize>(self, message: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let failed = |e: postcard::Error| CodecError::Encode(e.to_string());
        match self {
            Encoding::Postcard => {
                postcard::serialize_with_flavor(&(PROTOCOL_VERSION as u64), AppendTo(out)).map_err(failed)?;
                postcard::serialize_with_flavor(message, AppendTo(out)).map_err(failed)
            }
            Encoding::Json => serde_json::to_writer(out, &JsonFrame { protocol: PROTOCOL_VERSION as u64, message })
                .map_err(|e| CodecError::Encode(e.to_string())),
        }
    }

    /// Decodes a message of `limit` bytes at most, checking the protocol version first. The
    /// message may borrow from `bytes` (see [`crate::view`]).
    pub fn decode<'a, T: Deserialize<'a>>(self, bytes: &'a [u8], limit: usize) -> Result<T, CodecError> {
        if bytes.len() > limit {
            return Err(CodecError::TooLarge { size: bytes.len(), limit });
        }
        match self {
            Encoding::Postcard => {
                let (version, rest) = postcard::take_from_bytes::<u64>(bytes)
                    .map_err(|e| CodecError::Malformed(format!("protocol version: {e}")))?;
                check_version(version)?;
                let (message, trailing) =
                    postcard::take_from_bytes::<T>(rest).map_err(|e| CodecError::Malformed(e.to_string()))?;
                if !trailing.is_empty() {
                    return Err(CodecError::Malformed(format!("{} trailing bytes", trailing.len())));
                }
                Ok(message)
            }
            Encoding::Json => {
                let probe: VersionProbe =
                    serde_json::from_slice(bytes).map_err(|e| CodecError::Malformed(e.to_string()))?;
                check_version(probe.protocol)?;
                let frame: JsonFrame<T> =
                    serde_json::from_slice(bytes).map_err(|e| CodecError::Malformed(e.to_string()))?;
                Ok(frame.message)
            }
        }
    }
}

fn check_version(got: u64) -> Result<(), CodecError> {
    if got == PROTOCOL_VERSION as u64 {
        Ok(())
    } else {
        Err(CodecError::VersionMismatch { got, expected: PROTOCOL_VERSION })
    }
}

#[derive(Serialize, Deserialize)]
struct JsonFrame<T> {
    protocol: u64,
    message: T,
}

#[derive(Deserialize)]
struct VersionProbe {
    protocol: u64,
}

/// Response header marking a body of length-prefixed page frames (value `1`): the answer to
/// `GET /v1/changes?pages=…` (P > 1).
pub const PAGE_STREAM_HEADER: &str = "ferry-page-stream";

/// Bytes of the length prefix in front of each message of a stream.
pub const FRAME_PREFIX_BYTES: usize = 4;

impl Encoding {
    /// Encodes a message as one frame of a stream: its encoded length as a 4-byte big-endian
    /// integer, then the message as [`Encoding::encode`] writes it.
    pub fn encode_frame<T: Serialize>(self, message: &T) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        self.encode_frame_into(message, &mut out)?;
        Ok(out)
    }

    /// Encodes a message as one frame, as [`Encoding::encode_frame`] does, appending it to `out`.
    pub fn encode_frame_into<T: Serialize>(self, message: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_PREFIX_BYTES]);
        self.encode_into(message, out)?;
        let size = out.len() - start - FRAME_PREFIX_BYTES;
        let len =
            u32::try_from(size).map_err(|_| CodecError::Encode(format!("a frame of {size} bytes is too large")))?;
        out[start..start + FRAME_PREFIX_BYTES].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

/// A postcard output appending to a vector (postcard's own vector output starts a new one).
struct AppendTo<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Splits a stream of frames (see [`Encoding::encode_frame`]) arriving in chunks of any size
/// back into messages. A frame whose prefix announces more than the limit is refused before its
/// bytes are awaited; bytes left over when the stream ends are a truncated frame.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    limit: usize,
}

impl FrameReader {
    /// A reader of frames of at most `limit` bytes each (prefix not counted).
    pub fn new(limit: usize) -> Self {
        FrameReader { buf: Vec::new(), start: 0, limit }
    }

    /// Adds the next chunk of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete frame's message bytes, if one is complete.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, CodecError> {
        let rest = &self.buf[self.start..];
        let Some(prefix) = rest.first_chunk::<FRAME_PREFIX_BYTES>() else { return Ok(None) };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > self.limit {
            return Err(CodecError::TooLarge { size: len, limit: self.limit });
        }
        let end = FRAME_PREFIX_BYTES + len;
        if rest.len() < end {
            return Ok(None);
        }
        let at = self.start + FRAME_PREFIX_BYTES;
        self.start += end;
        Ok(Some(&self.buf[at..at + len]))
    }

    /// Bytes received and not yet returned as frames (non-zero once [`FrameReader::next_frame`]
    /// has nothing more at the end of a stream: the stream was cut inside a frame).
    pub fn partial_bytes(&self) -> usize {
        self.buf.len() - self.start
    }
}
