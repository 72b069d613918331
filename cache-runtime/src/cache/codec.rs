//! How cached values are encoded: one serde codec, inside a small envelope that records the entry's tags.
//!
//! # The codec
//!
//! Values are encoded with **MessagePack** ([`rmp_serde`], structs as arrays), chosen by measurement
//! (`cargo run --release -p examples --bin codec_bench`, a 12-field product row, medians):
//!
//! | codec | bytes | encode + decode | JSONB column (`serde_json::Value`) |
//! |---|---:|---:|---|
//! | serde_json | 391 | 1080 ns | yes |
//! | bincode 2 | 224 | 456 ns | no (fails at run time) |
//! | postcard | 221 | 432 ns | no (fails at run time) |
//! | **rmp-serde** | 227 | 499 ns | yes |
//! | rmp-serde, named fields | 337 | 739 ns | yes |
//!
//! MessagePack is within 3% of the most compact codec in size and about 70 ns slower per round trip, which
//! is under 0.1% of a Redis round trip (about 90 µs here); in exchange it is self-describing, so the serde
//! features that bincode and postcard reject at run time work: `serde_json::Value` for JSONB columns,
//! `#[serde(untagged)]` enums, anything using `deserialize_any`. JSON is twice the time and 1.7 times the
//! size.
//!
//! A value that no longer decodes (the struct changed, the bytes are corrupted) is a cache miss: the entry
//! is replaced by a fresh load, and counted in [`Stats::undecodable`](crate::Stats::undecodable).
//!
//! # The envelope
//!
//! `0xCA 0x01`, the number of tags (u32 LE), then for each tag its name and the token the entry recorded
//! (each a u32 LE length and UTF-8 bytes), then the codec's bytes. A lease (`\0L…`) can never be taken for
//! an entry, since entries start with `0xCA`.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The first bytes of every entry: a magic byte and the format version.
const MAGIC: [u8; 2] = [0xCA, 0x01];

/// A value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CodecError {
    /// Serialization failed (a type the codec cannot represent, such as a map with non-string keys in a
    /// format that needs them).
    #[error("cannot encode the value: {0}")]
    Encode(String),
    /// The bytes are not an entry of this type (written by another version, or corrupted).
    #[error("cannot decode the cached entry: {0}")]
    Decode(String),
}

/// Encodes `value` with the cache's codec.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Whether `payload` encodes "nothing" (`None`, `()`): a tombstone, which lives at most the negative TTL.
pub(crate) fn is_nothing(payload: &[u8]) -> bool {
    // MessagePack's nil.
    payload == [0xc0]
}

/// Decodes a value encoded by [`encode`].
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    rmp_serde::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))
}

/// A parsed entry, borrowing from the stored bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Envelope<'a> {
    /// The tags the entry recorded, with their tokens.
    pub(crate) tags: Vec<(&'a str, &'a str)>,
    /// The codec's bytes.
    pub(crate) payload: &'a [u8],
}

/// Wraps `payload` with the recorded `tags`.
pub(crate) fn seal<'a>(
    tags: impl IntoIterator<Item = (&'a str, &'a str)>,
    payload: &[u8],
) -> Vec<u8> {
    let tags: Vec<_> = tags.into_iter().collect();
    let mut out = Vec::with_capacity(
        MAGIC.len()
            + 4
            + payload.len()
            + tags
                .iter()
                .map(|(n, t)| 8 + n.len() + t.len())
                .sum::<usize>(),
    );
    out.extend_from_slice(&MAGIC);
    push_len(&mut out, tags.len());
    for (name, token) in tags {
        push_len(&mut out, name.len());
        out.extend_from_slice(name.as_bytes());
        push_len(&mut out, token.len());
        out.extend_from_slice(token.as_bytes());
    }
    out.extend_from_slice(payload);
    out
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    // Keys and tokens are far below 4 GiB; saturate rather than wrap if one is not.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
}

fn take_len(rest: &mut &[u8]) -> Option<usize> {
    let (len, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    usize::try_from(u32::from_le_bytes(*len)).ok()
}

fn take_str<'a>(rest: &mut &'a [u8]) -> Option<&'a str> {
    let n = take_len(rest)?;
    let (text, tail) = rest.split_at_checked(n)?;
    *rest = tail;
    std::str::from_utf8(text).ok()
}

/// Parses an entry; `None` when the bytes are not one.
pub(crate) fn open(bytes: &[u8]) -> Option<Envelope<'_>> {
    let mut rest = bytes.strip_prefix(&MAGIC)?;
    let count = take_len(&mut rest)?;
    let mut tags = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = take_str(&mut rest)?;
        let token = take_str(&mut rest)?;
        tags.push((name, token));
    }
    Some(Envelope {
        tags,
        payload: rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let sealed = seal([("a:1", "t1"), ("a:<>", "t2")], b"payload");
        let env = open(&sealed).unwrap();
        assert_eq!(env.tags, vec![("a:1", "t1"), ("a:<>", "t2")]);
        assert_eq!(env.payload, b"payload");
        assert_eq!(open(&seal([], b"")).unwrap().tags, vec![]);
    }

    #[test]
    fn garbage_is_not_an_envelope() {
        assert_eq!(open(b"garbage"), None);
        assert_eq!(open(b"\xCA\x01\x05\x00\x00\x00"), None);
        assert_eq!(open(b"\0Lsometoken"), None);
        let mut truncated = seal([("a:1", "t1")], b"");
        truncated.truncate(truncated.len() - 1);
        assert_eq!(open(&truncated), None);
    }

    #[test]
    fn option_values_round_trip() {
        let none: Option<(i64, String)> = None;
        assert_eq!(
            decode::<Option<(i64, String)>>(&encode(&none).unwrap()).unwrap(),
            None
        );
        let some = Some((7_i64, "x".to_owned()));
        assert_eq!(
            decode::<Option<(i64, String)>>(&encode(&some).unwrap()).unwrap(),
            some
        );
        assert!(decode::<Option<(i64, String)>>(b"\xc1").is_err());
    }
}
