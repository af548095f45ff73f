//! The sync wire format: frames exchanged over one ordered, breakable
//! stream per session, encoded with postcard.
//!
//! The driver frames each body with a 4-byte big-endian length; both ends
//! check the length against [`MAX_FRAME_BYTES`] before allocating
//! ([`check_frame_len`]). Every list inside a frame has its own bound,
//! checked on encode and decode. Decoding never trusts a list's declared
//! length: a length above the list's bound is refused before any element
//! is read, and at most [`MAX_PREALLOC_BYTES`] are reserved ahead of the
//! elements actually present ([`bounded`]), so a few bytes declaring a
//! huge count cost a few bytes. Anything malformed is a [`WireError`],
//! which ends the session; it never panics.

use crate::doc::Hash32;
use crate::ids::{DocKey, NodeId, Role};
use crate::signing::{Sig, MAX_CRED_BYTES, SIG_LEN};
use crate::store::Cursor;
use serde::{Deserialize, Serialize};

/// Version 1 of the Kizuna sync protocol; negotiated in `Hello` (H-1).
/// Version 2: every change travels with its author's signature, and
/// credentials of authors travel in `Authors` frames.
/// Version 3: live pushes follow a spanning tree per document kind
/// (`Live`, `IHave`, `Graft`, `Prune`; see `crdt::sessions`).
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest frame body either end sends or accepts (I-29).
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// Target size when splitting outgoing changes into frames.
pub const TARGET_FRAME_BYTES: usize = 256 << 10;
pub const MAX_RANGES_PER_FRAME: usize = 16384;
pub const MAX_ITEMS_PER_RANGE: usize = 4096;
pub const MAX_DOCS_PER_FRAME: usize = 8192;
pub const MAX_CHANGES_PER_DOC: usize = 65536;
pub const MAX_HEADS: usize = 64;
pub const MAX_CREDS_PER_FRAME: usize = 64;
/// Change hashes announced per document entry of an `IHave` (a document
/// with more new changes is listed again).
pub const MAX_ANNOUNCED_PER_DOC: usize = 64;
/// Change hashes per `IHave` frame, over all its documents (about 200 KB;
/// each announced hash costs the receiver a look-up).
pub const MAX_ANNOUNCED_PER_FRAME: usize = 4096;
/// Documents per `Graft` frame (each costs the receiver a queued document).
pub const MAX_GRAFT_DOCS: usize = 1024;
/// Bytes reserved for a list ahead of its decoded elements, at most.
pub const MAX_PREALLOC_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame exceeds a list bound: {0}")]
    Bound(&'static str),
}

/// One item of a reconciliation: a document and its heads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub key: DocKey,
    #[serde(deserialize_with = "bounded::heads")]
    pub heads: Vec<Hash32>,
}

/// New changes of one document, announced by hash (`IHave`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announced {
    pub key: DocKey,
    #[serde(deserialize_with = "bounded::announced_hashes")]
    pub hashes: Vec<Hash32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RangeBody {
    /// Sum of item hashes and the item count of the sender's range.
    Fingerprint { fp: [u8; 16], count: u32 },
    /// All the sender's documents in the range, each with a short digest
    /// of its heads.
    Digests {
        #[serde(deserialize_with = "bounded::digests")]
        items: Vec<(DocKey, [u8; 8])>,
    },
    /// The sender's full heads of documents that differ, at stage 1, 2 or
    /// 3 of the exchange (see `crdt::reconcile`).
    Items {
        #[serde(deserialize_with = "bounded::items")]
        items: Vec<Item>,
        stage: u8,
    },
}

/// A half-open key range `[lo, hi)`; `None` is the open end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub lo: Option<DocKey>,
    pub hi: Option<DocKey>,
    pub body: RangeBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocChanges {
    pub key: DocKey,
    #[serde(
        serialize_with = "byte_strings::serialize",
        deserialize_with = "bounded::changes"
    )]
    pub changes: Vec<Vec<u8>>,
    /// The authors' signatures of `changes`, [`SIG_LEN`] bytes each, in the
    /// same order (see [`crate::signing`]).
    #[serde(with = "serde_bytes")]
    pub sigs: Vec<u8>,
}

impl DocChanges {
    pub fn new(key: DocKey) -> DocChanges {
        DocChanges {
            key,
            changes: Vec::new(),
            sigs: Vec::new(),
        }
    }
    pub fn push(&mut self, bytes: Vec<u8>, sig: &Sig) {
        self.changes.push(bytes);
        self.sigs.extend_from_slice(sig);
    }
    /// The signature of the `i`th change.
    pub fn sig(&self, i: usize) -> Sig {
        let mut s = [0u8; SIG_LEN];
        s.copy_from_slice(&self.sigs[i * SIG_LEN..(i + 1) * SIG_LEN]);
        s
    }
}

/// Change bytes as byte strings: decoded with one copy each instead of one
/// visit per byte. In postcard a byte string and a sequence of `u8` are the
/// same bytes on the wire (length, then the bytes).
mod byte_strings {
    use serde::{Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|b| Bytes::new(b)))
    }

    /// At most `limit` byte strings (see [`super::bounded`]).
    pub fn deserialize_bounded<'de, D: Deserializer<'de>>(
        d: D,
        limit: usize,
        what: &'static str,
    ) -> Result<Vec<Vec<u8>>, D::Error> {
        Ok(super::bounded::seq::<D, ByteBuf>(d, limit, what)?
            .into_iter()
            .map(ByteBuf::into_vec)
            .collect())
    }
}

/// Decoding of the lists inside frames without trusting their declared
/// lengths: one more element than the bound is an error as soon as the
/// length is read, and capacity is reserved for at most
/// [`MAX_PREALLOC_BYTES`] of elements; beyond that the list grows only as
/// elements actually arrive (serde's own default reserves up to 1 MiB per
/// list on the declared length alone).
mod bounded {
    use super::*;
    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use std::marker::PhantomData;

    pub(super) fn seq<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
        limit: usize,
        what: &'static str,
    ) -> Result<Vec<T>, D::Error> {
        struct V<T> {
            limit: usize,
            what: &'static str,
            t: PhantomData<T>,
        }
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "at most {} {}", self.limit, self.what)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Vec<T>, A::Error> {
                let declared = a.size_hint().unwrap_or(0);
                if declared > self.limit {
                    return Err(de::Error::invalid_length(declared, &self));
                }
                let room = MAX_PREALLOC_BYTES / std::mem::size_of::<T>().max(1);
                let mut v = Vec::with_capacity(declared.min(room));
                while let Some(x) = a.next_element()? {
                    if v.len() == self.limit {
                        return Err(de::Error::invalid_length(v.len() + 1, &self));
                    }
                    v.push(x);
                }
                Ok(v)
            }
        }
        d.deserialize_seq(V {
            limit,
            what,
            t: PhantomData,
        })
    }

    pub(super) fn ranges<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Range>, D::Error> {
        seq(d, MAX_RANGES_PER_FRAME, "ranges per frame")
    }
    pub(super) fn digests<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(DocKey, [u8; 8])>, D::Error> {
        seq(d, MAX_ITEMS_PER_RANGE, "items per range")
    }
    pub(super) fn items<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Item>, D::Error> {
        seq(d, MAX_ITEMS_PER_RANGE, "items per range")
    }
    pub(super) fn heads<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Hash32>, D::Error> {
        seq(d, MAX_HEADS, "heads per item")
    }
    pub(super) fn docs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DocChanges>, D::Error> {
        seq(d, MAX_DOCS_PER_FRAME, "documents per frame")
    }
    pub(super) fn changes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        super::byte_strings::deserialize_bounded(d, MAX_CHANGES_PER_DOC, "changes per document")
    }
    pub(super) fn creds<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        super::byte_strings::deserialize_bounded(d, MAX_CREDS_PER_FRAME, "credentials per frame")
    }
    pub(super) fn announced<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Announced>, D::Error> {
        seq(d, MAX_ANNOUNCED_PER_FRAME, "announced documents per frame")
    }
    pub(super) fn announced_hashes<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<Hash32>, D::Error> {
        seq(d, MAX_ANNOUNCED_PER_DOC, "hashes per announced document")
    }
    pub(super) fn grafts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Item>, D::Error> {
        seq(d, MAX_GRAFT_DOCS, "documents per graft")
    }
    pub(super) fn kinds<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<crate::ids::Kind>, D::Error> {
        seq(d, crate::ids::Kind::ALL.len(), "kinds per prune")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Opens a session. `resume`: how far into the receiver's change log
    /// the sender already holds everything.
    Hello {
        version: u16,
        node: NodeId,
        role: Role,
        incarnation: u32,
        resume: Option<Cursor>,
    },
    /// The verdict on the peer's `resume` cursor: `true` means "I stream my
    /// log to you from there".
    Resume { ok: bool },
    /// Part of a reconciliation turn; the turn's last frame has `more: false`.
    Reconcile {
        #[serde(deserialize_with = "bounded::ranges")]
        ranges: Vec<Range>,
        more: bool,
    },
    /// Changes; `upto`, when present, says that after this frame the
    /// receiver holds everything of the sender's log up to that position.
    Changes {
        #[serde(deserialize_with = "bounded::docs")]
        docs: Vec<DocChanges>,
        upto: Option<Cursor>,
    },
    /// The sender closes the session; `code` is one of the `BYE_*` values.
    Bye { code: u16, reason: String },
    /// Credentials of authors whose changes follow (each sent at most once
    /// per session), so the receiver verifies authors it never met.
    Authors {
        #[serde(
            serialize_with = "byte_strings::serialize",
            deserialize_with = "bounded::creds"
        )]
        creds: Vec<Vec<u8>>,
    },
    /// Version 3. The sender has caught up: its `Changes` frames on this
    /// session are live pushes from here on, so a change in them that the
    /// receiver already holds is a duplicate of the tree (answered with
    /// `Prune`).
    Live,
    /// Version 3. New changes the sender holds and did not push (the
    /// receiver is lazy for their kind). `upto`, when present, says that
    /// after this frame the receiver holds everything of the sender's log
    /// up to that position, once it holds the changes announced.
    IHave {
        #[serde(deserialize_with = "bounded::announced")]
        docs: Vec<Announced>,
        upto: Option<Cursor>,
    },
    /// Version 3. "Send me these documents' changes beyond my heads, and
    /// push me their kind from now on": asked for announced changes that
    /// did not arrive in time.
    Graft {
        #[serde(deserialize_with = "bounded::grafts")]
        docs: Vec<Item>,
    },
    /// Version 3. "You pushed me changes I already held: announce these
    /// kinds to me instead of pushing them." Both ends mark the link lazy.
    Prune {
        #[serde(deserialize_with = "bounded::kinds")]
        kinds: Vec<crate::ids::Kind>,
    },
}

/// An upper bound of a range's encoded size (postcard), without encoding
/// it: what a reply of many ranges will cost on the wire.
pub fn range_bytes(r: &Range) -> usize {
    // Kind, a varint length (at most 5 bytes) and the id.
    let key = |k: &DocKey| 6 + k.id.len();
    let bound = |k: &Option<DocKey>| 1 + k.as_ref().map_or(0, key);
    let body = match &r.body {
        RangeBody::Fingerprint { .. } => 1 + 16 + 5,
        RangeBody::Digests { items } => 6 + items.iter().map(|(k, _)| key(k) + 8).sum::<usize>(),
        RangeBody::Items { items, .. } => {
            7 + items
                .iter()
                .map(|i| key(&i.key) + 5 + 32 * i.heads.len())
                .sum::<usize>()
        }
    };
    bound(&r.lo) + bound(&r.hi) + body
}

pub const BYE_VERSION: u16 = 1;
pub const BYE_PROTOCOL: u16 = 2;
pub const BYE_POLICY: u16 = 3;
pub const BYE_IDENTITY: u16 = 4;
pub const BYE_REVOKED: u16 = 5;

fn check_bounds(f: &Frame) -> Result<(), WireError> {
    match f {
        Frame::Reconcile { ranges, .. } => {
            if ranges.len() > MAX_RANGES_PER_FRAME {
                return Err(WireError::Bound("ranges per frame"));
            }
            for r in ranges {
                if let RangeBody::Digests { items } = &r.body {
                    if items.len() > MAX_ITEMS_PER_RANGE {
                        return Err(WireError::Bound("items per range"));
                    }
                }
                if let RangeBody::Items { items, .. } = &r.body {
                    if items.len() > MAX_ITEMS_PER_RANGE {
                        return Err(WireError::Bound("items per range"));
                    }
                    if items.iter().any(|i| i.heads.len() > MAX_HEADS) {
                        return Err(WireError::Bound("heads per item"));
                    }
                }
            }
        }
        Frame::Changes { docs, .. } => {
            if docs.len() > MAX_DOCS_PER_FRAME {
                return Err(WireError::Bound("documents per frame"));
            }
            if docs.iter().any(|d| d.changes.len() > MAX_CHANGES_PER_DOC) {
                return Err(WireError::Bound("changes per document"));
            }
            if docs
                .iter()
                .any(|d| d.sigs.len() != d.changes.len() * SIG_LEN)
            {
                return Err(WireError::Malformed(
                    "not exactly one signature per change".into(),
                ));
            }
        }
        Frame::Authors { creds } => {
            if creds.len() > MAX_CREDS_PER_FRAME {
                return Err(WireError::Bound("credentials per frame"));
            }
            if creds.iter().any(|c| c.len() > MAX_CRED_BYTES) {
                return Err(WireError::Bound("credential size"));
            }
        }
        Frame::IHave { docs, .. } => {
            if docs.iter().any(|d| d.hashes.len() > MAX_ANNOUNCED_PER_DOC) {
                return Err(WireError::Bound("hashes per announced document"));
            }
            // Implies at most as many documents.
            if docs.iter().map(|d| d.hashes.len()).sum::<usize>() > MAX_ANNOUNCED_PER_FRAME {
                return Err(WireError::Bound("hashes per announcement"));
            }
        }
        Frame::Graft { docs } => {
            if docs.len() > MAX_GRAFT_DOCS {
                return Err(WireError::Bound("documents per graft"));
            }
            if docs.iter().any(|d| d.heads.len() > MAX_HEADS) {
                return Err(WireError::Bound("heads per item"));
            }
        }
        Frame::Prune { kinds } if kinds.len() > crate::ids::Kind::ALL.len() => {
            return Err(WireError::Bound("kinds per prune"))
        }
        Frame::Bye { reason, .. } if reason.len() > 1024 => {
            return Err(WireError::Bound("bye reason"))
        }
        _ => {}
    }
    Ok(())
}

pub fn encode(f: &Frame) -> Result<Vec<u8>, WireError> {
    check_bounds(f)?;
    let bytes = postcard::to_allocvec(f).map_err(|e| WireError::Malformed(e.to_string()))?;
    check_frame_len(bytes.len())?;
    Ok(bytes)
}

pub fn decode(bytes: &[u8]) -> Result<Frame, WireError> {
    check_frame_len(bytes.len())?;
    let f: Frame = postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    check_bounds(&f)?;
    // Keys inside frames must be valid document keys (postcard bypasses
    // the constructor).
    let bad_key = |k: &DocKey| DocKey::new(k.kind, k.id.clone()).is_err();
    let invalid = match &f {
        Frame::Reconcile { ranges, .. } => ranges.iter().any(|r| {
            r.lo.as_ref().is_some_and(bad_key)
                || r.hi.as_ref().is_some_and(bad_key)
                || matches!(&r.body, RangeBody::Items { items, .. } if items.iter().any(|i| bad_key(&i.key)))
                || matches!(&r.body, RangeBody::Digests { items } if items.iter().any(|(k, _)| bad_key(k)))
        }),
        Frame::Changes { docs, .. } => docs.iter().any(|d| bad_key(&d.key)),
        Frame::IHave { docs, .. } => docs.iter().any(|d| bad_key(&d.key)),
        Frame::Graft { docs } => docs.iter().any(|d| bad_key(&d.key)),
        _ => false,
    };
    if invalid {
        return Err(WireError::Malformed("invalid document key".into()));
    }
    Ok(f)
}

/// Checks a length prefix before anything is allocated for the body.
pub fn check_frame_len(len: usize) -> Result<(), WireError> {
    if len > MAX_FRAME_BYTES {
        Err(WireError::TooLarge(len))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Kind;

    /// Change bytes go on the wire exactly as a plain `Vec<Vec<u8>>`
    /// would: peers built before the byte-string encoding read them.
    #[test]
    fn change_bytes_encode_as_a_sequence_of_u8() {
        #[derive(serde::Serialize)]
        struct Plain {
            key: DocKey,
            changes: Vec<Vec<u8>>,
        }
        let key = DocKey::new(crate::Kind::Presence, "h1").unwrap();
        let changes = vec![vec![], vec![0, 1, 255], (0..=255).collect(), vec![7; 300]];
        let ours = postcard::to_allocvec(&DocChanges {
            key: key.clone(),
            changes: changes.clone(),
            sigs: vec![],
        })
        .unwrap();
        let mut plain = postcard::to_allocvec(&Plain { key, changes }).unwrap();
        plain.push(0); // the empty signature string
        assert_eq!(ours, plain);
        let back: DocChanges = postcard::from_bytes(&plain).unwrap();
        assert_eq!(back.changes[3], vec![7; 300]);
    }

    #[test]
    fn malformed_frames_are_errors() {
        for bytes in [
            vec![],
            vec![0xff; 10],
            vec![2, 0xff, 0xff, 0xff, 0xff, 0x0f],
            vec![9],
        ] {
            assert!(decode(&bytes).is_err(), "{bytes:?}");
        }
        assert_eq!(
            check_frame_len(MAX_FRAME_BYTES + 1),
            Err(WireError::TooLarge(MAX_FRAME_BYTES + 1))
        );
        let too_many = Frame::Changes {
            docs: vec![
                DocChanges::new(DocKey::new(Kind::Person, "x").unwrap());
                MAX_DOCS_PER_FRAME + 1
            ],
            upto: None,
        };
        assert!(encode(&too_many).is_err());
    }

    /// The tree's frames (protocol 3) round-trip, and each list in them
    /// is bounded on encode and on decode.
    #[test]
    fn tree_frames_round_trip_within_their_bounds() {
        let key = DocKey::new(Kind::Presence, "h1").unwrap();
        let frames = [
            Frame::Live,
            Frame::IHave {
                docs: vec![Announced {
                    key: key.clone(),
                    hashes: vec![[7; 32]; MAX_ANNOUNCED_PER_DOC],
                }],
                upto: Some(Cursor {
                    seq: 9,
                    hash: [1; 32],
                }),
            },
            Frame::Graft {
                docs: vec![Item {
                    key: key.clone(),
                    heads: vec![[2; 32]],
                }],
            },
            Frame::Prune {
                kinds: Kind::ALL.to_vec(),
            },
        ];
        for f in frames {
            assert_eq!(decode(&encode(&f).unwrap()).unwrap(), f);
        }
        let over = [
            Frame::IHave {
                docs: vec![Announced {
                    key: key.clone(),
                    hashes: vec![[7; 32]; MAX_ANNOUNCED_PER_DOC + 1],
                }],
                upto: None,
            },
            Frame::Graft {
                docs: vec![Item {
                    key: key.clone(),
                    heads: vec![[2; 32]; MAX_HEADS + 1],
                }],
            },
            Frame::Prune {
                kinds: vec![Kind::Presence; Kind::ALL.len() + 1],
            },
            // Within the per-document bound, beyond the per-frame one.
            Frame::IHave {
                docs: vec![
                    Announced {
                        key: key.clone(),
                        hashes: vec![[7; 32]; MAX_ANNOUNCED_PER_DOC],
                    };
                    MAX_ANNOUNCED_PER_FRAME / MAX_ANNOUNCED_PER_DOC + 1
                ],
                upto: None,
            },
            Frame::Graft {
                docs: vec![
                    Item {
                        key: key.clone(),
                        heads: vec![],
                    };
                    MAX_GRAFT_DOCS + 1
                ],
            },
        ];
        for f in over {
            assert!(encode(&f).is_err(), "{f:?} encoded");
            let bytes = postcard::to_allocvec(&f).unwrap();
            assert!(decode(&bytes).is_err(), "{f:?} decoded");
        }
        let bad = DocKey {
            kind: Kind::Person,
            id: "../etc".into(),
        };
        let f = Frame::IHave {
            docs: vec![Announced {
                key: bad,
                hashes: vec![],
            }],
            upto: None,
        };
        assert!(decode(&postcard::to_allocvec(&f).unwrap()).is_err());
    }

    #[test]
    fn invalid_keys_inside_frames_are_rejected() {
        let bad = DocKey {
            kind: Kind::Person,
            id: "../etc".into(),
        };
        let f = Frame::Changes {
            docs: vec![DocChanges::new(bad)],
            upto: None,
        };
        let bytes = postcard::to_allocvec(&f).unwrap();
        assert!(decode(&bytes).is_err());
    }
}
