//! The pure APDU session: the SELECT / SELECT / READ BINARY conversation that
//! reads the user ID, over any [`Transmit`] implementation.
//!
//! [`read_user_id`] drives the whole read: it selects the application by
//! AID, selects the EF, reads `length` bytes at `offset`, follows `61xx`
//! (GET RESPONSE) and `6Cxx` (re-issue with the announced Le) within fixed
//! bounds, retries a `6281`/`6282` READ BINARY once, and validates the data
//! as a [`UserId`]. Every failure is a [`CardError`] that carries the step
//! and, where the card answered, the status word; each has a stable code and
//! a Japanese and an English message ([`CardError::message_ja`],
//! [`CardError::message_en`]). There is no partial result: either a
//! validated ID or an error.
//!
//! Every APDU passes [`ApduGuard::check`] before it reaches the transport.
//! The guard is an allow-list (SELECT by name or EF id, READ BINARY, GET
//! RESPONSE) plus a deny-list of the My Number card's applications, so
//! VERIFY (and every other PIN command) and the Individual Number
//! applications are refused even if a future caller tried. Each APDU sent is
//! recorded, header bytes only, in an [`ApduLog`] that tests inspect.

use std::fmt;
use std::sync::{Arc, Mutex};

use super::id::{UserId, UserIdError};
use super::profile::{hex, CardProfile, Encoding};

/// Most GET RESPONSE / re-issue exchanges for one command.
pub const MAX_CHAIN: usize = 8;
/// Largest response (data + SW) accepted from a short APDU.
pub const MAX_RESPONSE_LEN: usize = 258;
/// Largest total data accumulated over a 61xx chain.
pub const MAX_DATA_LEN: usize = 1024;

/// The transport a session talks through: PC/SC, or an in-memory card.
pub trait Transmit {
    /// Sends one command APDU and returns the response (data + SW1 SW2).
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError>;
}

impl<T: Transmit + ?Sized> Transmit for &mut T {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        (**self).transmit(apdu)
    }
}

/// Faults of the PC/SC service, the reader or the card link, each a
/// distinct case of `pcsc::Error` that people must be told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// pcscd is not running (`SCARD_E_NO_SERVICE`).
    #[error("card service not running")]
    NoService,
    /// pcscd stopped while we were using it (`SCARD_E_SERVICE_STOPPED`).
    #[error("card service stopped")]
    ServiceStopped,
    /// No reader is connected (`SCARD_E_NO_READERS_AVAILABLE`).
    #[error("no card reader")]
    NoReadersAvailable,
    /// The configured reader does not exist (`SCARD_E_UNKNOWN_READER`).
    #[error("unknown card reader")]
    UnknownReader,
    /// The reader went away (`SCARD_E_READER_UNAVAILABLE`), e.g. unplugged.
    #[error("card reader unavailable")]
    ReaderUnavailable,
    /// The card was removed (`SCARD_W_REMOVED_CARD`).
    #[error("card removed")]
    RemovedCard,
    /// The card was reset by someone else (`SCARD_W_RESET_CARD`).
    #[error("card reset")]
    ResetCard,
    /// The card does not answer its reset (`SCARD_W_UNRESPONSIVE_CARD`).
    #[error("card unresponsive")]
    UnresponsiveCard,
    /// The card has no power (`SCARD_W_UNPOWERED_CARD`).
    #[error("card unpowered")]
    UnpoweredCard,
    /// The ATR is not usable (`SCARD_W_UNSUPPORTED_CARD`, `SCARD_E_CARD_UNSUPPORTED`, bad ATR).
    #[error("card unsupported")]
    UnsupportedCard,
    /// No card in the reader (`SCARD_E_NO_SMARTCARD`).
    #[error("no card")]
    NoSmartcard,
    /// A PC/SC call timed out (`SCARD_E_TIMEOUT`).
    #[error("timeout")]
    Timeout,
    /// Another application holds the reader (`SCARD_E_SHARING_VIOLATION`).
    #[error("sharing violation")]
    SharingViolation,
    /// Reader/card link error (`SCARD_F_COMM_ERROR`, `SCARD_E_COMM_DATA_LOST`).
    #[error("communication error")]
    CommError,
    /// No common protocol (`SCARD_E_PROTO_MISMATCH`).
    #[error("protocol mismatch")]
    ProtocolMismatch,
    /// The response did not fit the receive buffer (`SCARD_E_INSUFFICIENT_BUFFER`).
    #[error("response too large")]
    InsufficientBuffer,
    /// The wait was cancelled (`SCARD_E_CANCELLED`).
    #[error("cancelled")]
    Cancelled,
    /// pcscd is overloaded (`SCARD_E_SERVER_TOO_BUSY`, `SCARD_E_NO_MEMORY`).
    #[error("card service busy")]
    ServiceBusy,
    /// Anything else from PC/SC, with the raw code for support.
    #[error("PC/SC error 0x{code:08X}")]
    Other { code: u32 },
}

impl TransportError {
    pub fn code(&self) -> &'static str {
        use TransportError::*;
        match self {
            NoService => "pcsc-no-service",
            ServiceStopped => "pcsc-service-stopped",
            NoReadersAvailable => "pcsc-no-readers",
            UnknownReader => "pcsc-unknown-reader",
            ReaderUnavailable => "pcsc-reader-unavailable",
            RemovedCard => "pcsc-removed-card",
            ResetCard => "pcsc-reset-card",
            UnresponsiveCard => "pcsc-unresponsive-card",
            UnpoweredCard => "pcsc-unpowered-card",
            UnsupportedCard => "pcsc-unsupported-card",
            NoSmartcard => "pcsc-no-card",
            Timeout => "pcsc-timeout",
            SharingViolation => "pcsc-sharing-violation",
            CommError => "pcsc-comm-error",
            ProtocolMismatch => "pcsc-protocol-mismatch",
            InsufficientBuffer => "pcsc-insufficient-buffer",
            Cancelled => "pcsc-cancelled",
            ServiceBusy => "pcsc-service-busy",
            Other { .. } => "pcsc-other",
        }
    }

    pub fn message_ja(&self) -> String {
        use TransportError::*;
        match self {
            NoService | ServiceStopped => {
                "カードサービス（pcscd）が動いていません。カードなしで氏名検索・登録できます".into()
            }
            NoReadersAvailable => {
                "カードリーダーが接続されていません。カードなしで氏名検索・登録できます".into()
            }
            UnknownReader => "指定されたカードリーダーが見つかりません".into(),
            ReaderUnavailable => "カードリーダーが外れました。接続を確認してください".into(),
            RemovedCard => "読み取り中にカードが離れました。もう一度タッチしてください".into(),
            ResetCard => "カードがリセットされました。もう一度タッチしてください".into(),
            UnresponsiveCard => "カードが応答しません。カードを置き直してください".into(),
            UnpoweredCard => "カードに電源が入っていません。カードを置き直してください".into(),
            UnsupportedCard => "このカードには対応していません".into(),
            NoSmartcard => "カードがありません。カードをタッチしてください".into(),
            Timeout => "カードの読み取りが時間切れになりました。もう一度タッチしてください".into(),
            SharingViolation => {
                "別のアプリケーションがカードリーダーを使用中です。そのアプリケーションを閉じてください"
                    .into()
            }
            CommError => "カードとの通信に失敗しました。もう一度タッチしてください".into(),
            ProtocolMismatch => "カードの通信方式に対応していません".into(),
            InsufficientBuffer => "カードの応答が大きすぎます".into(),
            Cancelled => "読み取りが取り消されました".into(),
            ServiceBusy => "カードサービスが混み合っています。少し待ってもう一度タッチしてください".into(),
            Other { code } => format!("カードサービスのエラーです（0x{code:08X}）"),
        }
    }

    pub fn message_en(&self) -> String {
        use TransportError::*;
        match self {
            NoService | ServiceStopped => {
                "Card service (pcscd) not running; search by name or register without a card".into()
            }
            NoReadersAvailable => {
                "No card reader connected; search by name or register without a card".into()
            }
            UnknownReader => "The configured card reader was not found".into(),
            ReaderUnavailable => "The card reader was disconnected; check the cable".into(),
            RemovedCard => "The card was removed during the read; tap again".into(),
            ResetCard => "The card was reset; tap again".into(),
            UnresponsiveCard => "The card does not respond; place it again".into(),
            UnpoweredCard => "The card is not powered; place it again".into(),
            UnsupportedCard => "This card is not supported".into(),
            NoSmartcard => "No card; tap a card".into(),
            Timeout => "The card read timed out; tap again".into(),
            SharingViolation => {
                "Another application is using the card reader; close that application".into()
            }
            CommError => "Communication with the card failed; tap again".into(),
            ProtocolMismatch => "The card's transmission protocol is not supported".into(),
            InsufficientBuffer => "The card's response is too large".into(),
            Cancelled => "The read was cancelled".into(),
            ServiceBusy => "The card service is busy; wait a moment and tap again".into(),
            Other { code } => format!("Card service error (0x{code:08X})"),
        }
    }

    /// True when the person should simply tap the card again.
    pub fn is_tap_again(&self) -> bool {
        use TransportError::*;
        matches!(
            self,
            RemovedCard
                | ResetCard
                | UnresponsiveCard
                | UnpoweredCard
                | Timeout
                | CommError
                | NoSmartcard
        )
    }

    /// True when the service or reader is gone and the watcher must reconnect.
    pub fn is_service_or_reader_lost(&self) -> bool {
        use TransportError::*;
        matches!(
            self,
            NoService | ServiceStopped | NoReadersAvailable | UnknownReader | ReaderUnavailable
        )
    }
}

/// A status word (SW1 SW2).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sw(pub u16);

impl Sw {
    pub const OK: Sw = Sw(0x9000);
    pub fn sw1(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub fn sw2(self) -> u8 {
        self.0 as u8
    }
}
impl fmt::Display for Sw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04X}", self.0)
    }
}
impl fmt::Debug for Sw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sw({:04X})", self.0)
    }
}

/// The step of the read an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Connect,
    SelectApp,
    SelectFile,
    ReadBinary,
    Validate,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Connect => "connect",
            Step::SelectApp => "select-app",
            Step::SelectFile => "select-file",
            Step::ReadBinary => "read-binary",
            Step::Validate => "validate",
        })
    }
}

/// What a non-9000 status word means for our read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// 6A82 on SELECT by AID: not a municipal card.
    NoMunicipalApp,
    /// 6A82 on SELECT EF (or READ BINARY): the app lacks the ID file.
    NoIdFile,
    /// 6982: security status not satisfied (the card wants a PIN).
    SecurityNotSatisfied,
    /// 6983: authentication method blocked.
    AuthBlocked,
    /// 63Cx / 6300: verification failed; `retries` from the low nibble.
    VerificationFailed { retries: Option<u8> },
    /// 6984: referenced data invalidated.
    DataInvalidated,
    /// 6985: conditions of use not satisfied.
    ConditionsNotSatisfied,
    /// 6986: command not allowed (no current EF).
    CommandNotAllowed,
    /// 6700: wrong length.
    WrongLength,
    /// 6A86 / 6B00: incorrect P1-P2 (offset outside the EF).
    WrongP1P2,
    /// 6A81: function not supported.
    FunctionNotSupported,
    /// 6A87 / 6A80: inconsistent Lc or data field.
    WrongData,
    /// 6D00: INS not supported.
    InsNotSupported,
    /// 6E00: CLA not supported.
    ClaNotSupported,
    /// 6F00: no precise diagnosis.
    NoDiagnosis,
    /// 6281: returned data may be corrupted (after one retry).
    DataCorrupted,
    /// 6282: end of file before Le bytes (after one retry).
    EndOfFile,
    /// 6581 / 6400: memory failure or execution error.
    CardFailure,
    /// 6881 / 6882: logical channel or secure messaging not supported.
    ChannelOrSmUnsupported,
    /// Any other SW.
    Unknown,
}

/// Protocol-level faults in the card's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolKind {
    /// Fewer than 2 bytes: no status word at all.
    ResponseTooShort { len: usize },
    /// Longer than a short APDU response can be.
    ResponseTooLong { len: usize },
    /// 61xx whose GET RESPONSE did not deliver the announced bytes, or a
    /// chain above [`MAX_DATA_LEN`].
    BadMoreData { sw: Sw },
    /// 6Cxx announcing fewer bytes than the ID needs.
    BadWrongLe { sw: Sw },
    /// More than [`MAX_CHAIN`] 61xx/6Cxx exchanges for one command.
    TooManyExchanges,
    /// Data in reply to a SELECT sent with "no response data" (P2=0C).
    UnexpectedData { len: usize },
    /// READ BINARY returned fewer bytes than the profile's length.
    Truncated { got: usize, want: usize },
    /// READ BINARY returned more bytes than the profile's length.
    TrailingBytes { got: usize, want: usize },
}

/// Why a card read failed. Never carries data read from the card.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    #[error("{step}: {source} / {ja}", ja = source.message_ja())]
    Transport { step: Step, source: TransportError },
    #[error("{step}: SW={sw}: {en}", en = self.message_en())]
    Status {
        step: Step,
        sw: Sw,
        kind: StatusKind,
    },
    #[error("{step}: {en}", en = self.message_en())]
    Protocol { step: Step, kind: ProtocolKind },
    #[error("validate: {source}")]
    InvalidId { source: UserIdError },
    #[error("{step}: refused by the APDU guard: {violation}")]
    Refused {
        step: Step,
        violation: GuardViolation,
    },
    #[error("card reader {name:?} not found")]
    ReaderNotFound { name: String },
    #[error("no card within {waited_ms} ms")]
    NoCard { waited_ms: u64 },
}

impl CardError {
    pub fn step(&self) -> Step {
        match self {
            CardError::Transport { step, .. }
            | CardError::Status { step, .. }
            | CardError::Protocol { step, .. }
            | CardError::Refused { step, .. } => *step,
            CardError::InvalidId { .. } => Step::Validate,
            CardError::ReaderNotFound { .. } | CardError::NoCard { .. } => Step::Connect,
        }
    }

    /// The card's status word, when the card answered with one.
    pub fn sw(&self) -> Option<Sw> {
        match self {
            CardError::Status { sw, .. } => Some(*sw),
            CardError::Protocol {
                kind: ProtocolKind::BadMoreData { sw } | ProtocolKind::BadWrongLe { sw },
                ..
            } => Some(*sw),
            _ => None,
        }
    }

    /// True when the right prompt is "tap again".
    pub fn is_tap_again(&self) -> bool {
        match self {
            CardError::Transport { source, .. } => source.is_tap_again(),
            CardError::Protocol {
                kind: ProtocolKind::ResponseTooShort { .. },
                ..
            } => true,
            _ => false,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use ProtocolKind as P;
        use StatusKind as S;
        match self {
            CardError::Transport { source, .. } => source.code(),
            CardError::Status { kind, .. } => match kind {
                S::NoMunicipalApp => "no-municipal-app",
                S::NoIdFile => "no-id-file",
                S::SecurityNotSatisfied => "security-not-satisfied",
                S::AuthBlocked => "auth-blocked",
                S::VerificationFailed { .. } => "verification-failed",
                S::DataInvalidated => "data-invalidated",
                S::ConditionsNotSatisfied => "conditions-not-satisfied",
                S::CommandNotAllowed => "command-not-allowed",
                S::WrongLength => "wrong-length",
                S::WrongP1P2 => "wrong-p1p2",
                S::FunctionNotSupported => "function-not-supported",
                S::WrongData => "wrong-data",
                S::InsNotSupported => "ins-not-supported",
                S::ClaNotSupported => "cla-not-supported",
                S::NoDiagnosis => "no-diagnosis",
                S::DataCorrupted => "data-corrupted",
                S::EndOfFile => "end-of-file",
                S::CardFailure => "card-failure",
                S::ChannelOrSmUnsupported => "channel-or-sm-unsupported",
                S::Unknown => "unknown-sw",
            },
            CardError::Protocol { kind, .. } => match kind {
                P::ResponseTooShort { .. } => "response-too-short",
                P::ResponseTooLong { .. } => "response-too-long",
                P::BadMoreData { .. } => "bad-more-data",
                P::BadWrongLe { .. } => "bad-wrong-le",
                P::TooManyExchanges => "too-many-exchanges",
                P::UnexpectedData { .. } => "unexpected-data",
                P::Truncated { .. } => "truncated",
                P::TrailingBytes { .. } => "trailing-bytes",
            },
            CardError::InvalidId { source } => source.code(),
            CardError::Refused { .. } => "apdu-refused",
            CardError::ReaderNotFound { .. } => "reader-not-found",
            CardError::NoCard { .. } => "no-card",
        }
    }

    pub fn message_ja(&self) -> String {
        use ProtocolKind as P;
        use StatusKind as S;
        let unsupported =
            |sw: &Sw| format!("対応していないカードか、リーダーのエラーです（SW={sw}）");
        match self {
            CardError::Transport { source, .. } => source.message_ja(),
            CardError::Status { sw, kind, .. } => match kind {
                S::NoMunicipalApp => "このカードには自治体アプリケーションがありません".into(),
                S::NoIdFile => "自治体アプリケーションに利用者IDがありません".into(),
                S::SecurityNotSatisfied => {
                    "このカードは暗証番号を求めています。Kizunaは暗証番号を使いません（カードなしで登録してください）".into()
                }
                S::AuthBlocked => {
                    "このカードの認証はロックされています。市区町村の窓口に相談してください".into()
                }
                S::VerificationFailed { .. } => {
                    "カードが認証の失敗を返しました。Kizunaは暗証番号を使いません".into()
                }
                S::DataInvalidated => "カードのデータが無効化されています".into(),
                S::ConditionsNotSatisfied => "カードの使用条件が満たされていません".into(),
                S::CommandNotAllowed => "カードがこの読み取りを許可していません".into(),
                S::DataCorrupted => "カードのデータが壊れている可能性があります".into(),
                S::EndOfFile => "カードのデータが途中で終わっています".into(),
                S::CardFailure => "カードのメモリに異常があります".into(),
                S::WrongLength
                | S::WrongP1P2
                | S::FunctionNotSupported
                | S::WrongData
                | S::InsNotSupported
                | S::ClaNotSupported
                | S::NoDiagnosis
                | S::ChannelOrSmUnsupported
                | S::Unknown => unsupported(sw),
            },
            CardError::Protocol { kind, .. } => match kind {
                P::ResponseTooShort { .. } => {
                    "カードの応答が不完全です。もう一度タッチしてください".into()
                }
                P::ResponseTooLong { .. } => "カードの応答が長すぎます".into(),
                P::BadMoreData { sw } => format!("カードの継続応答が不正です（SW={sw}）"),
                P::BadWrongLe { sw } => format!("カードが示した長さが不正です（SW={sw}）"),
                P::TooManyExchanges => "カードとのやり取りが多すぎるため中止しました".into(),
                P::UnexpectedData { .. } => "カードが予期しないデータを返しました".into(),
                P::Truncated { .. } => "カードの利用者IDが短すぎます".into(),
                P::TrailingBytes { .. } => "カードの利用者IDの後に余分なデータがあります".into(),
            },
            CardError::InvalidId { source } => match source {
                UserIdError::IndividualNumberShaped => {
                    "個人番号の形式のデータは読み取りません".into()
                }
                UserIdError::BadEncoding { .. } => "カードのIDの文字コードが不正です".into(),
                _ => "IDは13桁の数字でなければなりません".into(),
            },
            CardError::Refused { .. } => {
                "安全のため、このカード操作は禁止されています（設定を確認してください）".into()
            }
            CardError::ReaderNotFound { name } => {
                format!("カードリーダー「{name}」が見つかりません")
            }
            CardError::NoCard { .. } => "時間内にカードがタッチされませんでした".into(),
        }
    }

    pub fn message_en(&self) -> String {
        use ProtocolKind as P;
        use StatusKind as S;
        let unsupported = |sw: &Sw| format!("Unsupported card or reader error (SW={sw})");
        match self {
            CardError::Transport { source, .. } => source.message_en(),
            CardError::Status { sw, kind, .. } => match kind {
                S::NoMunicipalApp => "This card has no municipal application".into(),
                S::NoIdFile => "The municipal application has no user ID file".into(),
                S::SecurityNotSatisfied => {
                    "This card asks for a PIN; Kizuna never uses PINs (register without the card)"
                        .into()
                }
                S::AuthBlocked => {
                    "Authentication on this card is blocked; ask the municipal office".into()
                }
                S::VerificationFailed { .. } => {
                    "The card reported a failed verification; Kizuna never uses PINs".into()
                }
                S::DataInvalidated => "The data on the card has been invalidated".into(),
                S::ConditionsNotSatisfied => {
                    "The card's conditions of use are not satisfied".into()
                }
                S::CommandNotAllowed => "The card does not allow this read".into(),
                S::DataCorrupted => "The data on the card may be corrupted".into(),
                S::EndOfFile => "The data on the card ends early".into(),
                S::CardFailure => "The card reports a memory failure".into(),
                S::WrongLength
                | S::WrongP1P2
                | S::FunctionNotSupported
                | S::WrongData
                | S::InsNotSupported
                | S::ClaNotSupported
                | S::NoDiagnosis
                | S::ChannelOrSmUnsupported
                | S::Unknown => unsupported(sw),
            },
            CardError::Protocol { kind, .. } => match kind {
                P::ResponseTooShort { len } => {
                    format!("Incomplete card response ({len} bytes); tap again")
                }
                P::ResponseTooLong { len } => format!("Card response too long ({len} bytes)"),
                P::BadMoreData { sw } => {
                    format!("Invalid more-data chaining from the card (SW={sw})")
                }
                P::BadWrongLe { sw } => format!("Invalid length announced by the card (SW={sw})"),
                P::TooManyExchanges => "Too many exchanges with the card; read aborted".into(),
                P::UnexpectedData { len } => format!("Unexpected data from the card ({len} bytes)"),
                P::Truncated { got, want } => {
                    format!("The user ID on the card is too short ({got} of {want} bytes)")
                }
                P::TrailingBytes { got, want } => {
                    format!("Extra bytes after the user ID on the card ({got}, expected {want})")
                }
            },
            CardError::InvalidId { source } => match source {
                UserIdError::IndividualNumberShaped => {
                    "rejected: individual-number-shaped input".into()
                }
                UserIdError::BadEncoding { encoding } => {
                    format!("The ID on the card is not valid {encoding} text")
                }
                _ => "ID must be 13 digits".into(),
            },
            CardError::Refused { violation, .. } => {
                format!("Card command refused for safety: {violation}; check the configuration")
            }
            CardError::ReaderNotFound { name } => format!("Card reader {name:?} not found"),
            CardError::NoCard { .. } => "No card was tapped in time".into(),
        }
    }

    /// "日本語 / English", for one-line display.
    pub fn message(&self) -> String {
        format!("{} / {}", self.message_ja(), self.message_en())
    }
}

/// Classifies a status word for a step. `9000`, `61xx` and `6Cxx` are
/// handled by the exchange loop and never reach here.
pub fn classify_sw(step: Step, sw: Sw) -> StatusKind {
    use StatusKind as S;
    match (sw.0, sw.sw1(), sw.sw2()) {
        (0x6A82, _, _) if step == Step::SelectApp => S::NoMunicipalApp,
        (0x6A82, _, _) => S::NoIdFile,
        (0x6982, _, _) => S::SecurityNotSatisfied,
        (0x6983, _, _) => S::AuthBlocked,
        (0x6300, _, _) => S::VerificationFailed { retries: None },
        (_, 0x63, x) if x & 0xF0 == 0xC0 => S::VerificationFailed {
            retries: Some(x & 0x0F),
        },
        (0x6984, _, _) => S::DataInvalidated,
        (0x6985, _, _) => S::ConditionsNotSatisfied,
        (0x6986, _, _) => S::CommandNotAllowed,
        (0x6700, _, _) => S::WrongLength,
        (0x6A86 | 0x6B00, _, _) => S::WrongP1P2,
        (0x6A81, _, _) => S::FunctionNotSupported,
        (0x6A80 | 0x6A87, _, _) => S::WrongData,
        (0x6D00, _, _) => S::InsNotSupported,
        (0x6E00, _, _) => S::ClaNotSupported,
        (0x6F00, _, _) => S::NoDiagnosis,
        (0x6281, _, _) => S::DataCorrupted,
        (0x6282, _, _) => S::EndOfFile,
        (0x6581 | 0x6400, _, _) => S::CardFailure,
        (0x6881 | 0x6882, _, _) => S::ChannelOrSmUnsupported,
        _ => S::Unknown,
    }
}

/// Why the guard refused an APDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GuardViolation {
    #[error("VERIFY or another PIN command (INS {ins:02X})")]
    PinCommand { ins: u8 },
    #[error("SELECT of a My Number card application")]
    MyNumberApplication,
    #[error("command not on the allow-list (INS {ins:02X}, P1 {p1:02X})")]
    NotAllowed { ins: u8, p1: u8 },
    #[error("malformed APDU ({len} bytes)")]
    Malformed { len: usize },
}

/// My Number card application identifiers and families Kizuna must never
/// select: the card-face AP (…0402), the text-assist AP (…0408, holds the
/// Individual Number), the whole `D3 92 10 00 31 00 01 01 04` family, and
/// the JPKI AP (`D3 92 F0 00 26 …`).
pub const FORBIDDEN_AID_PREFIXES: &[&[u8]] = &[
    &[0xD3, 0x92, 0x10, 0x00, 0x31, 0x00, 0x01, 0x01, 0x04],
    &[0xD3, 0x92, 0xF0, 0x00, 0x26],
];
/// The text-assist application (券面入力補助AP).
pub const MY_NUMBER_TEXT_AP: [u8; 10] =
    [0xD3, 0x92, 0x10, 0x00, 0x31, 0x00, 0x01, 0x01, 0x04, 0x08];
/// The card-face application (券面AP).
pub const MY_NUMBER_FACE_AP: [u8; 10] =
    [0xD3, 0x92, 0x10, 0x00, 0x31, 0x00, 0x01, 0x01, 0x04, 0x02];
/// The JPKI application (公的個人認証AP).
pub const JPKI_AP: [u8; 10] = [0xD3, 0x92, 0xF0, 0x00, 0x26, 0x01, 0x00, 0x00, 0x00, 0x01];

/// The gate every APDU passes before it is sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApduGuard;

impl ApduGuard {
    /// True when selecting `aid` (also as a partial DF name) could reach a
    /// My Number card application.
    pub fn is_forbidden_aid(aid: &[u8]) -> bool {
        !aid.is_empty()
            && FORBIDDEN_AID_PREFIXES
                .iter()
                .any(|prefix| aid.starts_with(prefix) || prefix.starts_with(aid))
    }

    pub fn check(apdu: &[u8]) -> Result<(), GuardViolation> {
        if apdu.len() < 4 {
            return Err(GuardViolation::Malformed { len: apdu.len() });
        }
        let (ins, p1) = (apdu[1], apdu[2]);
        // VERIFY (20/21), CHANGE REFERENCE DATA (24/25), ENABLE/DISABLE
        // VERIFICATION REQUIREMENT (26/28), RESET RETRY COUNTER (2C/2D).
        if matches!(ins, 0x20 | 0x21 | 0x24 | 0x25 | 0x26 | 0x28 | 0x2C | 0x2D) {
            return Err(GuardViolation::PinCommand { ins });
        }
        match (ins, p1) {
            (0xA4, 0x04) => {
                let data = select_data(apdu)?;
                if Self::is_forbidden_aid(data) {
                    return Err(GuardViolation::MyNumberApplication);
                }
                Ok(())
            }
            (0xA4, 0x02) => {
                let data = select_data(apdu)?;
                if data.len() != 2 {
                    return Err(GuardViolation::Malformed { len: apdu.len() });
                }
                Ok(())
            }
            // READ BINARY with a 15-bit offset (bit 8 of P1 clear, so no
            // short-EF selection), and GET RESPONSE.
            (0xB0, p1) if p1 & 0x80 == 0 && apdu.len() == 5 => Ok(()),
            (0xC0, 0x00) if apdu.len() == 5 => Ok(()),
            _ => Err(GuardViolation::NotAllowed { ins, p1 }),
        }
    }
}

fn select_data(apdu: &[u8]) -> Result<&[u8], GuardViolation> {
    let malformed = GuardViolation::Malformed { len: apdu.len() };
    let lc = *apdu.get(4).ok_or(malformed)? as usize;
    // Case 3 (no Le) or case 4 (one Le byte).
    if lc == 0 || !(apdu.len() == 5 + lc || apdu.len() == 6 + lc) {
        return Err(malformed);
    }
    Ok(&apdu[5..5 + lc])
}

/// One APDU as recorded in the log: header only, never the data field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApduRecord {
    pub header: [u8; 4],
    pub step: Step,
    /// False when the guard refused it (it was not sent).
    pub sent: bool,
}

impl fmt::Display for ApduRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}{}",
            self.step,
            hex(&self.header),
            if self.sent { "" } else { " REFUSED" }
        )
    }
}

/// Shared, bounded log of APDU headers. Clones share the same log; an
/// optional file receives one line per APDU (append mode).
#[derive(Clone, Default)]
pub struct ApduLog {
    inner: Arc<Mutex<LogInner>>,
}

#[derive(Default)]
struct LogInner {
    records: std::collections::VecDeque<ApduRecord>,
    file: Option<std::fs::File>,
}

impl fmt::Debug for ApduLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApduLog({} records)", self.records().len())
    }
}

/// Records kept in memory; older ones are dropped first.
pub const APDU_LOG_CAPACITY: usize = 4096;

impl ApduLog {
    pub fn new() -> ApduLog {
        ApduLog::default()
    }

    /// Also appends every record to `path`.
    pub fn with_file(path: &std::path::Path) -> std::io::Result<ApduLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let log = ApduLog::default();
        log.inner.lock().unwrap_or_else(|e| e.into_inner()).file = Some(file);
        Ok(log)
    }

    pub fn record(&self, record: ApduRecord) {
        use std::io::Write;
        tracing::debug!(step = %record.step, header = %hex(&record.header), sent = record.sent, "apdu");
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.records.len() == APDU_LOG_CAPACITY {
            inner.records.pop_front();
        }
        inner.records.push_back(record);
        if let Some(file) = inner.file.as_mut() {
            // The log is diagnostics; a full disk must not fail the read.
            let _ = writeln!(file, "{record}");
        }
    }

    pub fn records(&self) -> Vec<ApduRecord> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .records
            .iter()
            .copied()
            .collect()
    }
}

/// A parsed response: data and status word.
struct Response {
    data: Vec<u8>,
    sw: Sw,
}

/// One guarded, logged exchange.
fn exchange<T: Transmit + ?Sized>(
    t: &mut T,
    log: &ApduLog,
    step: Step,
    apdu: &[u8],
) -> Result<Response, CardError> {
    let mut header = [0u8; 4];
    let n = apdu.len().min(4);
    header[..n].copy_from_slice(&apdu[..n]);
    if let Err(violation) = ApduGuard::check(apdu) {
        log.record(ApduRecord {
            header,
            step,
            sent: false,
        });
        tracing::error!(%step, %violation, "apdu refused by guard");
        return Err(CardError::Refused { step, violation });
    }
    log.record(ApduRecord {
        header,
        step,
        sent: true,
    });
    let raw = t
        .transmit(apdu)
        .map_err(|source| CardError::Transport { step, source })?;
    if raw.len() < 2 {
        return Err(CardError::Protocol {
            step,
            kind: ProtocolKind::ResponseTooShort { len: raw.len() },
        });
    }
    if raw.len() > MAX_RESPONSE_LEN {
        return Err(CardError::Protocol {
            step,
            kind: ProtocolKind::ResponseTooLong { len: raw.len() },
        });
    }
    let sw = Sw(u16::from_be_bytes([raw[raw.len() - 2], raw[raw.len() - 1]]));
    let mut data = raw;
    data.truncate(data.len() - 2);
    Ok(Response { data, sw })
}

/// Sends a command and follows 61xx / 6Cxx. Returns the data of a 9000
/// answer; any other final SW is an error. `min_le` is the number of bytes
/// the caller needs (a 6Cxx offering fewer is a bad value).
fn command<T: Transmit + ?Sized>(
    t: &mut T,
    log: &ApduLog,
    step: Step,
    apdu: &[u8],
    min_le: usize,
) -> Result<Vec<u8>, CardError> {
    let mut current = apdu.to_vec();
    let mut data = Vec::new();
    // After a 61xx, the bytes the next GET RESPONSE must deliver, and the SW
    // that announced them.
    let mut announced: Option<(usize, Sw)> = None;
    for _ in 0..MAX_CHAIN {
        let resp = exchange(t, log, step, &current)?;
        let chaining = resp.sw == Sw::OK || resp.sw.sw1() == 0x61;
        if let Some((want, sw)) = announced.take() {
            if chaining && resp.data.len() != want {
                return Err(CardError::Protocol {
                    step,
                    kind: ProtocolKind::BadMoreData { sw },
                });
            }
        }
        if chaining {
            data.extend_from_slice(&resp.data);
        }
        match resp.sw.sw1() {
            0x90 if resp.sw == Sw::OK => return Ok(data),
            0x61 => {
                // More data: fetch with GET RESPONSE. xx = 00 means 256.
                let xx = resp.sw.sw2();
                let want = if xx == 0 { 256 } else { usize::from(xx) };
                if data.len() + want > MAX_DATA_LEN {
                    return Err(CardError::Protocol {
                        step,
                        kind: ProtocolKind::BadMoreData { sw: resp.sw },
                    });
                }
                announced = Some((want, resp.sw));
                current = vec![0x00, 0xC0, 0x00, 0x00, xx];
            }
            0x6C => {
                // Wrong Le: re-issue the same command with Le = xx.
                let xx = resp.sw.sw2();
                let offered = if xx == 0 { 256 } else { usize::from(xx) };
                if offered < min_le || current.len() != 5 || current[1] == 0xC0 {
                    return Err(CardError::Protocol {
                        step,
                        kind: ProtocolKind::BadWrongLe { sw: resp.sw },
                    });
                }
                current[4] = xx;
            }
            _ => return Err(status_or_protocol(step, resp.sw)),
        }
    }
    Err(CardError::Protocol {
        step,
        kind: ProtocolKind::TooManyExchanges,
    })
}

fn status_or_protocol(step: Step, sw: Sw) -> CardError {
    CardError::Status {
        step,
        sw,
        kind: classify_sw(step, sw),
    }
}

/// Reads and validates the user ID: SELECT app, SELECT EF, READ BINARY.
pub fn read_user_id<T: Transmit + ?Sized>(
    t: &mut T,
    profile: &CardProfile,
    log: &ApduLog,
) -> Result<UserId, CardError> {
    let select_app = command(t, log, Step::SelectApp, &profile.select_app_apdu(), 0)?;
    if !select_app.is_empty() {
        return Err(CardError::Protocol {
            step: Step::SelectApp,
            kind: ProtocolKind::UnexpectedData {
                len: select_app.len(),
            },
        });
    }
    let select_file = command(t, log, Step::SelectFile, &profile.select_file_apdu(), 0)?;
    if !select_file.is_empty() {
        return Err(CardError::Protocol {
            step: Step::SelectFile,
            kind: ProtocolKind::UnexpectedData {
                len: select_file.len(),
            },
        });
    }
    let want = usize::from(profile.length);
    let read = profile.read_binary_apdu();
    let data = match command(t, log, Step::ReadBinary, &read, want) {
        // 6281 / 6282: reject the answer, retry once, then give up.
        Err(CardError::Status {
            kind: StatusKind::DataCorrupted | StatusKind::EndOfFile,
            sw,
            ..
        }) => {
            tracing::warn!(%sw, "read binary warning, retrying once");
            command(t, log, Step::ReadBinary, &read, want)?
        }
        other => other?,
    };
    decode_user_id(profile, &data)
}

/// Checks the length and decodes the bytes of the ID file.
pub fn decode_user_id(profile: &CardProfile, data: &[u8]) -> Result<UserId, CardError> {
    let want = usize::from(profile.length);
    if data.len() < want {
        return Err(CardError::Protocol {
            step: Step::ReadBinary,
            kind: ProtocolKind::Truncated {
                got: data.len(),
                want,
            },
        });
    }
    if data.len() > want {
        return Err(CardError::Protocol {
            step: Step::ReadBinary,
            kind: ProtocolKind::TrailingBytes {
                got: data.len(),
                want,
            },
        });
    }
    let invalid = |source| CardError::InvalidId { source };
    let id = match profile.encoding {
        Encoding::Ascii => {
            if !data.is_ascii() {
                return Err(invalid(UserIdError::BadEncoding { encoding: "ASCII" }));
            }
            let text = std::str::from_utf8(data)
                .map_err(|_| invalid(UserIdError::BadEncoding { encoding: "ASCII" }))?;
            UserId::parse(text)
        }
        Encoding::Utf8 => {
            let text = std::str::from_utf8(data)
                .map_err(|_| invalid(UserIdError::BadEncoding { encoding: "UTF-8" }))?;
            UserId::normalize(text)
        }
    };
    id.map_err(|source| {
        if source == UserIdError::IndividualNumberShaped {
            // The log line has no digits, by design (I-13).
            tracing::warn!("card read rejected: individual-number-shaped input");
        }
        invalid(source)
    })
}
