//! Values, rows and primary keys.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One column value. The variants map onto the portable column types of the schema
/// ([`crate::ColumnType`]); `Null` fits any nullable column.
///
/// In JSON a value is an object with one key naming its kind: `{"integer": 42}`, `{"text": "a"}`,
/// `{"bytes": "00ff"}` (hex), `"null"`. Integers are exact 64-bit numbers (see `docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A signed 64-bit integer.
    Integer(i64),
    /// A finite 64-bit float. Non-finite numbers are rejected by the server as `type_mismatch`.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Raw bytes (hex in JSON).
    Bytes(#[serde(with = "hex_bytes")] Vec<u8>),
    /// A reference to a content-addressed blob that travels outside the batches.
    Blob(BlobRef),
}

impl Value {
    /// A short name of the value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Integer(_) => "integer",
            Value::Real(_) => "real",
            Value::Text(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::Blob(_) => "blob",
        }
    }

    /// The integer inside, if this is an integer.
    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Value::Integer(i) => Some(*i),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::Real(r) => write!(f, "{r}"),
            Value::Text(t) => write!(f, "{t:?}"),
            Value::Bytes(b) => write!(f, "x'{}'", hex::encode(b)),
            Value::Blob(b) => write!(f, "blob:{}", b.sha256),
        }
    }
}

/// A reference to a blob (photo, audio, video): its content address plus what a device needs
/// to know before downloading it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    /// Lower-case hex sha256 of the content; the blob's address.
    pub sha256: String,
    /// Size of the content in bytes.
    pub size: u64,
    /// Media type, e.g. `image/jpeg`.
    pub media_type: String,
}

impl BlobRef {
    /// The content address of a blob: the lower-case hex sha256 of its bytes, read from `content`
    /// in 64 KiB pieces (memory does not grow with the blob). Devices and the server compute
    /// addresses with this one definition; clients in other languages compute the same digest.
    pub fn address_of(mut content: impl std::io::Read) -> std::io::Result<String> {
        use sha2::Digest as _;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = content.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hex::encode(hasher.finalize()))
    }
}

/// The primary key of a row: the values of the table's primary-key columns, in the order the
/// schema lists them. Single-column keys have one element; composite keys have several.
///
/// For auto-numbered tables a device uses a *temporary* key (a negative integer) until the
/// server answers with the real one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Key(pub Vec<Value>);

impl Key {
    /// A single-integer key.
    pub fn int(i: i64) -> Self {
        Key(vec![Value::Integer(i)])
    }

    /// Whether this is a temporary key: a single negative integer, a range the server never assigns.
    pub fn is_temporary(&self) -> bool {
        matches!(self.0.as_slice(), [Value::Integer(i)] if *i < 0)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(")?;
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{v}")?;
        }
        f.write_str(")")
    }
}

/// A row as column name → value. Columns absent from the map are not part of the message.
pub type Row = BTreeMap<String, Value>;

/// Bytes as a hex string in human-readable encodings (JSON) and as raw bytes in binary ones.
pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&hex::encode(bytes)) } else { s.serialize_bytes(bytes) }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            hex::decode(s.as_bytes()).map_err(D::Error::custom)
        } else {
            let b: serde_bytes_compat::ByteBuf = Deserialize::deserialize(d)?;
            Ok(b.0)
        }
    }

    /// Minimal owned byte buffer that deserializes from `bytes` or a sequence (postcard gives bytes).
    mod serde_bytes_compat {
        use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
        use std::fmt;

        pub struct ByteBuf(pub Vec<u8>);

        impl<'de> Deserialize<'de> for ByteBuf {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = ByteBuf;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E>(self, v: &[u8]) -> Result<ByteBuf, E> {
                        Ok(ByteBuf(v.to_vec()))
                    }
                    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                        Ok(ByteBuf(v))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                        while let Some(b) = seq.next_element()? {
                            out.push(b);
                        }
                        Ok(ByteBuf(out))
                    }
                }
                d.deserialize_byte_buf(V)
            }
        }
    }
}
