//! The engine's inputs and outputs: everything a driver (`node` or `sim`)
//! hands to [`crate::engine::Engine::handle`] and everything it must carry
//! out afterwards.
//!
//! Drivers pass time as [`Now`] (wall time shown to people and stamped on
//! facts, monotonic time for timers) and randomness as an `RngCore`; the
//! engine reads neither clock nor entropy itself.

use crate::model::{
    BloodType, ConsentBasis, Disclosure, Eligibility, EligibilityStatus, FamilyContact,
    MedicalSection, ShelterInfo,
};
use crate::store::{LocationRow, PersonRow, ShelterRow, StoreError};
use crate::text::TextError;
use crate::views::MedicalView;
use crate::{Kind, NodeId, Role};
use serde::{Deserialize, Serialize};

/// Time as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Wall clock, ms since the Unix epoch; may be wrong (B-1..B-4).
    pub wall_ms: u64,
    /// Monotonic ms since an arbitrary start; used for timers only.
    pub mono_ms: u64,
    /// Whether the driver believes the wall clock (NTP/peer agreement).
    pub wall_trusted: bool,
}

/// A driver-chosen handle for one session with one peer. A peer may have
/// two sessions at once.
pub type SessionId = u64;

/// Who asks: the operator logged in at the UI or API, for audit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator(pub String);

#[derive(Clone, Debug)]
pub enum Input {
    /// A user or API command. `op_id` makes retries idempotent.
    Command {
        op_id: String,
        operator: Operator,
        cmd: Command,
    },
    /// A read-only query; nothing is written.
    Query { query: Query },
    /// A session is up: the peer's identity comes from its verified
    /// certificate. The dialing side has `initiator = true`.
    Connected {
        session: SessionId,
        node: NodeId,
        role: Role,
        initiator: bool,
    },
    /// One frame body from the session's stream.
    Frame { session: SessionId, bytes: Vec<u8> },
    /// The stream ended or the connection broke.
    Disconnected { session: SessionId },
    /// The transport wrote `bytes` more of the session's frame bodies onto
    /// the connection (it reports every frame it was given, in order). The
    /// engine keeps at most a send window of frames unwritten per session:
    /// past it, catch-up waits and new changes are announced instead of
    /// pushed, so a slow peer or link slows its session instead of growing
    /// a queue.
    Sent { session: SessionId, bytes: usize },
    /// The outcome of a [`MailRequest`] the driver tried to send.
    MailOutcome {
        message_id: String,
        outcome: MailOutcome,
    },
    /// Periodic timer: drains send queues, retries mail. Drivers tick at
    /// least once a second.
    Tick,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Headquarters: registry import, one durable commit per batch.
    ImportHouseholds {
        households: Vec<crate::model::Household>,
    },
    PutShelter {
        shelter: ShelterInfo,
    },
    /// Register someone without a registry entry; replies with the new id.
    RegisterPerson {
        name: String,
        kana: String,
        birth_date: Option<String>,
        note: String,
    },
    CheckIn {
        person_ids: Vec<String>,
        shelter_id: Option<String>,
    },
    CheckOut {
        person_ids: Vec<String>,
        shelter_id: Option<String>,
    },
    Transfer {
        person_ids: Vec<String>,
        from_shelter: Option<String>,
        to_shelter: String,
    },
    PutMedical {
        person_id: String,
        update: MedicalUpdate,
    },
    /// Audited read of a medical profile (a command because it writes the
    /// audit entry before anything is shown). `reason` is an
    /// [`crate::access::AccessReason`] code; `break_glass` needs a live
    /// [`Command::BreakGlass`] grant. Every refusal is audited too.
    ReadMedical {
        person_id: String,
        reason: String,
        break_glass: bool,
    },
    /// A break-glass grant: lets this operator read this person's profile
    /// without recorded consent for [`crate::access::BREAK_GLASS_TTL_MS`].
    /// Audited and flagged for review at headquarters.
    BreakGlass {
        person_id: String,
        reason: String,
        justification: String,
    },
    PutEligibility {
        person_id: String,
        eligibility: Eligibility,
    },
    PutContacts {
        person_id: String,
        contacts: Vec<FamilyContact>,
        disclosure: Disclosure,
    },
    /// A batch of a municipal data set (one durable commit), all or
    /// nothing; the same records again change nothing.
    Import {
        records: ImportRecords,
    },
    /// Open or close a shelter, change its capacity (hq).
    UpdateShelter {
        shelter_id: String,
        open: Option<bool>,
        capacity: Option<u32>,
    },
    /// Audited offline eligibility check (clinic: full record; hq:
    /// insurance numbers masked; other roles refused, and the refusal
    /// audited).
    CheckEligibility {
        person_id: String,
    },
    /// Appends an audit entry for an export that left the node: what,
    /// for which scope, how many records.
    RecordExport {
        what: String,
        scope: String,
        count: u64,
    },
}

/// One person's family contacts and disclosure choices; importing it
/// replaces what the person's contacts document held.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContactSet {
    pub person_id: String,
    pub contacts: Vec<FamilyContact>,
    pub disclosure: Disclosure,
}

/// A whole pre-registered medical profile; importing it replaces what the
/// person's medical document held (entries get ids derived from their
/// text, so importing the same profile twice writes nothing new).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MedicalProfile {
    pub person_id: String,
    pub blood_type: Option<BloodType>,
    pub consent: ConsentBasis,
    pub entries: Vec<(MedicalSection, String)>,
}

impl std::fmt::Debug for MedicalProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MedicalProfile({}, {} entries)",
            self.person_id,
            self.entries.len()
        )
    }
}

/// The record batches of [`Command::Import`], one data set each.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "dataset", content = "records", rename_all = "snake_case")]
pub enum ImportRecords {
    Shelters(Vec<ShelterInfo>),
    Contacts(Vec<ContactSet>),
    Medical(Vec<MedicalProfile>),
    /// (person id, record).
    Eligibility(Vec<(String, Eligibility)>),
}

impl ImportRecords {
    pub fn len(&self) -> usize {
        match self {
            ImportRecords::Shelters(v) => v.len(),
            ImportRecords::Contacts(v) => v.len(),
            ImportRecords::Medical(v) => v.len(),
            ImportRecords::Eligibility(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dataset(&self) -> &'static str {
        match self {
            ImportRecords::Shelters(_) => "shelters",
            ImportRecords::Contacts(_) => "contacts",
            ImportRecords::Medical(_) => "medical",
            ImportRecords::Eligibility(_) => "eligibility",
        }
    }
}

/// The Individual-Number guard over a whole command or query: every
/// string in it, ids and entry ids included, through
/// [`crate::text::find_individual_number`]. The engine runs it before it
/// looks at anything else, so no later error can echo such a value.
pub fn guard_individual_numbers<T: Serialize>(request: &T) -> Result<(), TextError> {
    match crate::text::find_individual_number(request) {
        Some(field) => Err(TextError::IndividualNumber { field }),
        None => Ok(()),
    }
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::ImportHouseholds { .. } => "import_households",
            Command::PutShelter { .. } => "put_shelter",
            Command::RegisterPerson { .. } => "register_person",
            Command::CheckIn { .. } => "check_in",
            Command::CheckOut { .. } => "check_out",
            Command::Transfer { .. } => "transfer",
            Command::PutMedical { .. } => "put_medical",
            Command::ReadMedical { .. } => "read_medical",
            Command::BreakGlass { .. } => "break_glass",
            Command::PutEligibility { .. } => "put_eligibility",
            Command::PutContacts { .. } => "put_contacts",
            Command::Import { .. } => "import",
            Command::UpdateShelter { .. } => "update_shelter",
            Command::CheckEligibility { .. } => "check_eligibility",
            Command::RecordExport { .. } => "record_export",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MedicalUpdate {
    pub blood_type: Option<BloodType>,
    pub consent: Option<ConsentBasis>,
    /// New entries: (section, text).
    #[serde(default)]
    pub add: Vec<(MedicalSection, String)>,
    /// Edited entries: (section, entry id, new text).
    #[serde(default)]
    pub edit: Vec<(MedicalSection, String, String)>,
    /// Removed entries: (section, entry id).
    #[serde(default)]
    pub remove: Vec<(MedicalSection, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Query {
    Status,
    Persons {
        limit: usize,
        offset: usize,
    },
    Search {
        q: String,
        limit: usize,
    },
    /// The household of a card's holder, with the holder
    /// ([`HouseholdView::holder`]): what a tap on a card reader shows.
    HouseholdByCard {
        card_user_id: String,
    },
    Person {
        person_id: String,
    },
    /// Every presence event this node holds for a person, oldest first:
    /// where they arrived, left and were transferred, including the
    /// concurrent events of a conflict. Empty on roles without presence.
    PresenceHistory {
        person_id: String,
    },
    Shelters,
    Conflicts,
    Outbox,
    /// Everyone with a location, optionally at one shelter, with their
    /// do-not-disclose flag (headquarters knows it; elsewhere false).
    Evacuees {
        shelter_id: Option<String>,
        /// Also the household address from the registry (one document
        /// load per household: rosters, not bulk feeds).
        #[serde(default)]
        with_address: bool,
    },
    /// Full shelter records (address, kind, open), from their documents.
    ShelterInfos,
    /// Registry residents per address district, with how many are
    /// accounted for.
    Districts,
    /// Residents of a district with no presence anywhere, a page at a time
    /// (person ids after `after`).
    Unaccounted {
        district: String,
        after: String,
        limit: usize,
    },
    /// Persons checked in now, by the hour (or `bucket_ms`) they arrived.
    Arrivals {
        bucket_ms: u64,
    },
    /// Audit entries of every audit chain held here, newest first
    /// (headquarters reviews break-glass use with `break_glass_only`).
    Audit {
        break_glass_only: bool,
        limit: usize,
    },
    /// Who is in (or pending in) a shelter; `None` = this shelter node's.
    Roster {
        shelter_id: Option<String>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Imported {
        households: usize,
        persons: usize,
    },
    Done,
    Registered {
        person_id: String,
    },
    /// New presence events, and persons already in the requested state
    /// (a second tap or double submit: D-3).
    Presence {
        event_ids: Vec<String>,
        already: Vec<String>,
    },
    Medical {
        person_id: String,
        view: MedicalView,
        audit_seq: u64,
    },
    ImportedRecords {
        dataset: String,
        records: usize,
    },
    Eligibility {
        person_id: String,
        status: EligibilityStatus,
        /// Masked unless this is a clinic node.
        record: Option<Eligibility>,
        masked: bool,
        /// The Japan date the status was judged on.
        on_date: String,
        audit_seq: u64,
    },
    /// A break-glass grant, valid until `expires_wall_ms` (as the node's
    /// wall clock sees it).
    Granted {
        person_id: String,
        expires_wall_ms: u64,
        audit_seq: u64,
    },
    Audited {
        audit_seq: u64,
    },
}

/// A command that did not happen, and why. Nothing was written.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Invalid(#[from] TextError),
    #[error("role {role} may not {action}")]
    Forbidden { role: Role, action: String },
    #[error("{what} not found: {id}")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Storage(#[from] StoreError),
}

impl From<crate::doc::DocError> for CommandError {
    fn from(e: crate::doc::DocError) -> Self {
        CommandError::Rejected(e.to_string())
    }
}

impl CommandError {
    /// Machine-readable code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::Invalid(_) => "invalid_input",
            CommandError::Forbidden { .. } => "forbidden",
            CommandError::NotFound { .. } => "not_found",
            CommandError::Rejected(_) => "rejected",
            CommandError::Storage(StoreError::Full) => "storage_full",
            CommandError::Storage(_) => "storage_error",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub node_id: NodeId,
    pub role: Role,
    pub connected: bool,
    /// Wall ms of the last frame received from this peer.
    pub last_sync: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub node_id: NodeId,
    pub role: Role,
    pub incarnation: u32,
    pub peers: Vec<PeerStatus>,
    pub documents: usize,
    pub quarantined: usize,
    pub violations: u64,
    pub mail_queue: usize,
    pub mail_oldest_ms: Option<u64>,
    pub duplicate_mail_risk: u64,
    /// Documents held per kind (`registry` is the resident registry's
    /// households: a new node's first sync is watched here).
    pub documents_by_kind: std::collections::BTreeMap<Kind, usize>,
    /// Headquarters: family mails per outbox state.
    pub outbox: std::collections::BTreeMap<crate::model::MailStatus, usize>,
    /// Entries this node has written to its own audit chain.
    pub audit_entries: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PersonDetail {
    pub person: PersonRow,
    pub location: Option<LocationRow>,
    /// The concurrent presence events behind a conflict, if any.
    pub conflicts: Vec<crate::model::PresenceEvent>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HouseholdView {
    pub household_id: String,
    pub members: Vec<(PersonRow, Option<LocationRow>)>,
    /// The card holder's person id when the household was found by card
    /// ([`Query::HouseholdByCard`]); one of `members`.
    pub holder: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShelterView {
    pub shelter: ShelterRow,
    pub occupancy: u32,
    /// Wall ms of the last presence change from that shelter seen here.
    pub last_sync: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OutboxRow {
    pub person_id: String,
    pub contact_id: String,
    pub state: crate::model::MailState,
}

/// A person with a location (roster, PFIF).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Evacuee {
    pub person: PersonRow,
    pub location: LocationRow,
    /// The resident asked that nothing about them be disclosed.
    pub withheld: bool,
    /// The household address, when asked for and known.
    pub address: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum QueryReply {
    Status(Status),
    Persons(Vec<PersonRow>),
    Household(Option<HouseholdView>),
    Person(Option<PersonDetail>),
    /// `None` when the person is not in the registry.
    PresenceHistory(Option<Vec<crate::model::PresenceEvent>>),
    Shelters(Vec<ShelterView>),
    Conflicts(Vec<LocationRow>),
    Outbox(Vec<OutboxRow>),
    Evacuees(Vec<Evacuee>),
    ShelterInfos(Vec<ShelterInfo>),
    Districts(Vec<crate::store::DistrictCount>),
    Arrivals(Vec<(u64, u32)>),
    Audit(Vec<crate::model::AuditEntry>),
    Roster(Vec<(PersonRow, LocationRow)>),
}

/// A family safety mail for the driver to send with SMTP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailRequest {
    /// Stable per (arrival, contact); reused on every retry.
    pub message_id: String,
    pub to: String,
    pub subject: String,
    pub body: String,
    pub person_id: String,
    pub contact_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailOutcome {
    /// The server answered 250 to the message.
    Sent,
    /// 4xx or the server was unreachable before the message: retry later.
    Transient(String),
    /// 5xx: never retried.
    Permanent(String),
    /// The connection broke after the message was sent, before the reply.
    Indeterminate(String),
}

/// Something the UI may want to show (server-sent events in `node`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum UiEvent {
    DocumentChanged {
        kind: Kind,
        id: String,
    },
    Conflict {
        person_id: String,
    },
    PeerViolation {
        node_id: NodeId,
        reason: String,
    },
    /// A document set aside as damaged was rebuilt from a peer's copy and
    /// is served again; `lost_changes` of the changes it held before the
    /// damage are not in the rebuilt copy (see `crdt::replica`).
    DocumentRepaired {
        kind: Kind,
        id: String,
        lost_changes: u32,
    },
}

/// Why the engine closes a session, in a form the driver can pass on to
/// the peer (`node` sends it as the QUIC close code), so the peer's dialer
/// can tell a refusal, which redialling soon only repeats, from a session
/// that merely ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// The peer broke a rule of the protocol or of policy, or is backed
    /// off after one (its sessions are refused for a while).
    Violation,
    /// The peer speaks another protocol version: an upgrade is needed.
    Version,
    /// The peer's hello names another node or role than its certificate.
    Identity,
    /// Refused for now through no fault of the peer: it already holds as
    /// many sessions with us as it may.
    Busy,
    /// Anything else: the peer said goodbye, a cut session's leftovers
    /// arrived before its hello, or this node failed to store or encode.
    Other,
}

#[derive(Clone, Debug)]
pub enum Output {
    /// The answer to a command, sent only after its commit.
    Reply {
        op_id: String,
        result: Result<Reply, CommandError>,
    },
    QueryReply(Result<QueryReply, CommandError>),
    /// A frame body for the driver to write, length-prefixed, to the session.
    Send {
        session: SessionId,
        bytes: Vec<u8>,
    },
    /// Close the session (after sending anything queued before).
    Close {
        session: SessionId,
        reason: String,
        cause: CloseCause,
    },
    SendMail(MailRequest),
    Event(UiEvent),
}
