//! The on-disk schema of the SQLite store and its numbered migrations.
//!
//! A Kizuna database is recognised by its SQLite `application_id`
//! ([`APPLICATION_ID`], the ASCII bytes `KZNA`) and versioned by
//! `user_version` (= the number of migrations applied). Migration `n`
//! (1-based) turns a version `n - 1` database into a version `n` one; each
//! runs in its own `BEGIN IMMEDIATE` transaction that also bumps
//! `user_version` (and, for the first, sets `application_id`), so a crash
//! leaves either the old or the new version, never half of one, and the
//! next open simply runs the rest (A-5). Migrations are append-only: never
//! edit one that has shipped, add a new one.
//!
//! # Tables (version 1)
//!
//! - `meta`: one row (`id = 0`), the node's [`crdt::store::Meta`] as JSON.
//! - `changes`: the raw Automerge change log. `seq` is a local
//!   AUTOINCREMENT sequence (never reused, so "after the snapshot" is a
//!   plain `seq >` comparison), `hash` is UNIQUE (dedup by change hash).
//! - `docs`: one row per (kind code, id): concatenated 32-byte heads, the
//!   newest compacted snapshot and the `changes.seq` it covers.
//! - `persons`, `cards`, `locations`, `shelters`: projection rows. Each row
//!   names the document it was derived from (`source_kind`, `source_id`)
//!   and its position `pos` in that document's projection, so replacing a
//!   document's projection is "delete by source, insert", and ties in every
//!   query break exactly as [`crdt::store::MemStore`] breaks them
//!   (document key order, then position).
//! - `ops`: operation id → result JSON, first write wins (A-3, D-3).
//! - `peer_heads`: (peer, kind, id) → heads the peer was last known to hold.
//! - `quarantine`: (kind, id) → why the document was set aside (A-10).
//! - `sync_cursors` (version 2): peer → (seq, hash), how far into that
//!   peer's change log this node durably holds everything.
//! - `withheld` (version 3): projection rows of contacts documents, the
//!   persons who asked that nothing about them be disclosed.
//! - `persons.district` (version 4): a registry resident's address district.
//! - `changes.seal` (version 5): the author's signature of the change and
//!   the author's node hash ([`crdt::signing::Seal`], 72 bytes); NULL for a
//!   change stored before changes were signed or made offline, which the
//!   node signs at its next start when it is the author, and which is never
//!   relayed otherwise. `authors`: verified author credentials by node
//!   hash, relayed to peers with the changes they signed.
//! - `damaged` (version 7): (kind, id) → documents whose stored changes
//!   could not be trusted, set aside until a peer's copy rebuilds them: the
//!   heads the store named when the damage was found, and the hashes of
//!   dropped changes this node wrote (`crdt::store::Damaged`).
//! - `authors` (version 8): every credential of a node hash, not only the
//!   newest (a rotated node's older changes are signed with its older
//!   key), in arrival order (`seq`); a credential is stored once.
//! - `peer_heads.incarnation` (version 9): `peer` is the peer's certified
//!   node id (it was `node.iN`, a key the peer could multiply by declaring
//!   new incarnations), and its rows are of one incarnation: writing one of
//!   another drops the peer's older rows, so a peer has at most one row per
//!   document. The table is rebuilt; its version 8 rows, hints only, are
//!   dropped.
//!
//! Kinds are stored as [`crdt::Kind::code`] integers so `ORDER BY kind, id`
//! is exactly [`crdt::DocKey`]'s `Ord`; text columns use SQLite's BINARY
//! collation (memcmp of UTF-8), which is Rust's `str` order.

/// `PRAGMA application_id` of every Kizuna store: `0x4B5A4E41`, the ASCII
/// bytes "KZNA". Any other non-zero id, or a zero id on a database that
/// already has tables, is somebody else's file and is refused.
pub const APPLICATION_ID: i32 = 0x4B5A_4E41;

/// Migration `i` (0-based) takes `user_version` from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7, V8, V9];

/// The schema version this program writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Version 3: persons with the do-not-disclose flag, derived from their
/// contacts documents (headquarters). The rows of documents already
/// stored are derived in the same transaction, in Rust
/// (`SqliteStore::migrate`).
const V3: &str = r#"
CREATE TABLE withheld (
    source_kind INTEGER NOT NULL,
    source_id   TEXT NOT NULL,
    pos         INTEGER NOT NULL,
    person_id   TEXT NOT NULL,
    PRIMARY KEY (source_kind, source_id, pos)
);
CREATE INDEX withheld_person_id ON withheld (person_id);
"#;

/// Version 4: the address district of registry residents
/// (`crdt::derive::district_of`), for headquarters' count of residents
/// not yet accounted for per district. Rows written before it have no
/// district until their document is derived again.
const V4: &str = r#"
ALTER TABLE persons ADD COLUMN district TEXT;
CREATE INDEX persons_district ON persons (district, person_id) WHERE district IS NOT NULL;
"#;

/// Version 7: damaged documents awaiting a copy from a peer (A-8, A-10).
const V7: &str = r#"
CREATE TABLE damaged (
    kind    INTEGER NOT NULL,
    doc_id  TEXT NOT NULL,
    heads   BLOB NOT NULL CHECK (length(heads) % 32 = 0),
    at_risk BLOB NOT NULL CHECK (length(at_risk) % 32 = 0),
    PRIMARY KEY (kind, doc_id)
);
"#;

/// Version 5: signed changes. Existing changes get no seal: the node signs
/// its own at its next start; others' are kept and not relayed.
const V5: &str = r#"
ALTER TABLE changes ADD COLUMN seal BLOB CHECK (seal IS NULL OR length(seal) = 72);
CREATE INDEX changes_unsigned ON changes (seq) WHERE seal IS NULL;
CREATE TABLE authors (
    author BLOB PRIMARY KEY CHECK (length(author) = 8),
    cred   BLOB NOT NULL
);
"#;

/// Version 6: check-ins by arrival time in index order, for headquarters'
/// arrivals chart (`Store::arrivals`) without sorting every location.
/// Partial, so it never looks better to the planner than
/// `locations_shelter_status` for the occupancy count (an index on
/// `(status, since_ms)` did, and made that count ten times slower).
const V6: &str = r#"
CREATE INDEX locations_in_since ON locations (since_ms) WHERE status = 'in';
"#;

/// Version 8: several credentials per author (certificate rotation). The
/// credentials held move over, one per author as before.
const V8: &str = r#"
CREATE TABLE authors_v8 (
    seq    INTEGER PRIMARY KEY,
    author BLOB NOT NULL CHECK (length(author) = 8),
    cred   BLOB NOT NULL,
    UNIQUE (author, cred)
);
INSERT INTO authors_v8 (author, cred) SELECT author, cred FROM authors ORDER BY author;
DROP TABLE authors;
ALTER TABLE authors_v8 RENAME TO authors;
"#;

/// Version 9: peer heads keyed by the certified node id, of one
/// incarnation per peer (issue 12). The old rows are hints keyed by
/// `node.iN`; dropping them costs at most a larger first send.
const V9: &str = r#"
DROP TABLE peer_heads;
CREATE TABLE peer_heads (
    peer        TEXT NOT NULL,
    kind        INTEGER NOT NULL,
    doc_id      TEXT NOT NULL,
    heads       BLOB NOT NULL CHECK (length(heads) % 32 = 0),
    incarnation INTEGER NOT NULL,
    PRIMARY KEY (peer, kind, doc_id)
);
"#;

/// Version 2: receiver-held sync cursors into each peer's change log.
const V2: &str = r#"
CREATE TABLE sync_cursors (
    peer TEXT PRIMARY KEY,
    seq  INTEGER NOT NULL,
    hash BLOB NOT NULL CHECK (length(hash) = 32)
);
"#;

const V1: &str = r#"
CREATE TABLE meta (
    id   INTEGER PRIMARY KEY CHECK (id = 0),
    json TEXT NOT NULL
);

CREATE TABLE changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    hash   BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    kind   INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    bytes  BLOB NOT NULL
);
CREATE INDEX changes_doc ON changes (kind, doc_id, seq);

CREATE TABLE docs (
    kind         INTEGER NOT NULL,
    id           TEXT NOT NULL,
    heads        BLOB NOT NULL CHECK (length(heads) % 32 = 0),
    snapshot     BLOB,
    snapshot_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, id)
);

CREATE TABLE persons (
    source_kind  INTEGER NOT NULL,
    source_id    TEXT NOT NULL,
    pos          INTEGER NOT NULL,
    person_id    TEXT NOT NULL,
    household_id TEXT,
    name         TEXT NOT NULL,
    kana         TEXT NOT NULL,
    search_key   TEXT NOT NULL,
    -- crdt::text::search_key(name), computed at insert: search matches it too.
    name_key     TEXT NOT NULL,
    birth_date   TEXT,
    PRIMARY KEY (source_kind, source_id, pos)
);
CREATE INDEX persons_person_id ON persons (person_id, source_kind, source_id, pos);
CREATE INDEX persons_household_id ON persons (household_id, person_id);
CREATE INDEX persons_search_key ON persons (search_key);

CREATE TABLE cards (
    source_kind  INTEGER NOT NULL,
    source_id    TEXT NOT NULL,
    pos          INTEGER NOT NULL,
    card_user_id TEXT NOT NULL,
    household_id TEXT NOT NULL,
    person_id    TEXT NOT NULL,
    PRIMARY KEY (source_kind, source_id, pos)
);
CREATE INDEX cards_card_user_id ON cards (card_user_id, source_kind, source_id, pos);
CREATE INDEX cards_household_id ON cards (household_id);

CREATE TABLE locations (
    source_kind INTEGER NOT NULL,
    source_id   TEXT NOT NULL,
    pos         INTEGER NOT NULL,
    person_id   TEXT NOT NULL,
    shelter_id  TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('in', 'out', 'pending')),
    -- u64 milliseconds stored bit-for-bit as i64.
    since_ms    INTEGER NOT NULL,
    conflict    INTEGER NOT NULL CHECK (conflict IN (0, 1)),
    PRIMARY KEY (source_kind, source_id, pos)
);
CREATE INDEX locations_person_id ON locations (person_id, source_kind, source_id, pos);
CREATE INDEX locations_shelter_status ON locations (shelter_id, status);
CREATE INDEX locations_conflict ON locations (person_id) WHERE conflict = 1;

CREATE TABLE shelters (
    source_kind INTEGER NOT NULL,
    source_id   TEXT NOT NULL,
    pos         INTEGER NOT NULL,
    shelter_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    capacity    INTEGER NOT NULL,
    PRIMARY KEY (source_kind, source_id, pos)
);
CREATE INDEX shelters_shelter_id ON shelters (shelter_id);

CREATE TABLE ops (
    op_id  TEXT PRIMARY KEY,
    result TEXT NOT NULL
);

CREATE TABLE peer_heads (
    peer   TEXT NOT NULL,
    kind   INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    heads  BLOB NOT NULL CHECK (length(heads) % 32 = 0),
    PRIMARY KEY (peer, kind, doc_id)
);

CREATE TABLE quarantine (
    kind   INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (kind, doc_id)
);
"#;

/// Every table with the ORDER BY that lists its rows deterministically,
/// for [`super::SqliteStore::content_digest`].
pub(crate) const DIGEST_TABLES: &[(&str, &str)] = &[
    ("meta", "id"),
    ("changes", "seq"),
    ("docs", "kind, id"),
    ("persons", "source_kind, source_id, pos"),
    ("cards", "source_kind, source_id, pos"),
    ("locations", "source_kind, source_id, pos"),
    ("shelters", "source_kind, source_id, pos"),
    ("withheld", "source_kind, source_id, pos"),
    ("ops", "op_id"),
    ("peer_heads", "peer, kind, doc_id"),
    ("quarantine", "kind, doc_id"),
    ("authors", "seq"),
    ("damaged", "kind, doc_id"),
];
