//! Unit tests of the pure APDU session against the in-memory card model
//! ([`EmuCard`]) and a scripted card that answers whatever a test (or
//! proptest) says: every status-word mapping, chaining, 6Cxx, truncation,
//! trailing bytes, removal at each step and the Individual Number guard.

use std::collections::{BTreeSet, VecDeque};

use proptest::prelude::*;

use super::apdu::*;
use super::emu::{EmuCard, Faults};
use super::id::UserIdError;
use super::profile::{hex, CardProfile, Encoding};
use super::reader::map_pcsc;

const ID: &str = "1234567890123";

fn card(faults: Faults) -> EmuCard {
    EmuCard::new(CardProfile::default(), ID.as_bytes(), faults)
}

fn read(card: &mut impl Transmit) -> (Result<super::id::UserId, CardError>, ApduLog) {
    let log = ApduLog::new();
    let r = read_user_id(card, &CardProfile::default(), &log);
    (r, log)
}

fn respond_at(k: u32, raw: &[u8]) -> Faults {
    Faults {
        respond_at_step: Some((k, raw.to_vec())),
        respond_count: 1,
        ..Faults::default()
    }
}

/// A card that answers from a script, then 9000 forever.
struct Scripted {
    answers: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
}

impl Scripted {
    fn new(answers: &[&[u8]]) -> Scripted {
        Scripted {
            answers: answers.iter().map(|a| a.to_vec()).collect(),
            sent: Vec::new(),
        }
    }
}

impl Transmit for Scripted {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.sent.push(apdu.to_vec());
        Ok(self.answers.pop_front().unwrap_or_else(|| vec![0x90, 0x00]))
    }
}

/// A transport that must never be reached.
struct MustNotSend;
impl Transmit for MustNotSend {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        panic!("APDU {} reached the transport", hex(apdu));
    }
}

fn id_with_sw(sw: u16) -> Vec<u8> {
    let mut v = ID.as_bytes().to_vec();
    v.extend_from_slice(&sw.to_be_bytes());
    v
}

#[test]
fn reads_the_default_card() {
    let mut c = EmuCard::with_user_id(ID);
    let (r, log) = read(&mut c);
    assert_eq!(r.unwrap().as_str(), ID);
    let headers: Vec<String> = log.records().iter().map(|r| hex(&r.header)).collect();
    assert_eq!(headers, ["00A4040C", "00A4020C", "00B00000"]);
    assert_eq!(
        c.received.apdus.iter().map(|a| hex(a)).collect::<Vec<_>>(),
        ["00A4040C08F04B495A554E4101", "00A4020C020001", "00B000000D"]
    );
    assert!(!c.received.any_forbidden());
}

#[test]
fn reads_at_an_offset_and_with_a_custom_profile() {
    let profile = CardProfile {
        aid: vec![0xA0, 0x00, 0x00, 0x09, 0x99, 0x01],
        file_id: [0x12, 0x34],
        offset: 0x0105,
        length: 13,
        encoding: Encoding::Ascii,
    };
    profile.validate().unwrap();
    let mut content = vec![b'x'; 0x105];
    content.extend_from_slice(ID.as_bytes());
    let mut c = EmuCard::new(
        CardProfile {
            offset: 0,
            ..profile.clone()
        },
        &content,
        Faults::default(),
    );
    let r = read_user_id(&mut c, &profile, &ApduLog::new());
    assert_eq!(r.unwrap().as_str(), ID);
    assert_eq!(hex(&c.received.apdus[2]), "00B001050D");
}

/// Every status word we map, at the step where it is answered.
#[test]
fn every_status_word_maps_to_its_message() {
    let cases: &[(u32, u16, &str, &str, &str)] = &[
        (
            1,
            0x6A82,
            "no-municipal-app",
            "自治体アプリケーションがありません",
            "This card has no municipal application",
        ),
        (
            2,
            0x6A82,
            "no-id-file",
            "利用者IDがありません",
            "no user ID file",
        ),
        (
            3,
            0x6A82,
            "no-id-file",
            "利用者IDがありません",
            "no user ID file",
        ),
        (
            1,
            0x6982,
            "security-not-satisfied",
            "暗証番号",
            "never uses PINs",
        ),
        (
            3,
            0x6982,
            "security-not-satisfied",
            "暗証番号",
            "never uses PINs",
        ),
        (3, 0x6983, "auth-blocked", "ロック", "blocked"),
        (
            3,
            0x63C2,
            "verification-failed",
            "認証の失敗",
            "failed verification",
        ),
        (
            3,
            0x63C0,
            "verification-failed",
            "認証の失敗",
            "failed verification",
        ),
        (
            3,
            0x6300,
            "verification-failed",
            "認証の失敗",
            "failed verification",
        ),
        (3, 0x6984, "data-invalidated", "無効化", "invalidated"),
        (
            3,
            0x6985,
            "conditions-not-satisfied",
            "使用条件",
            "conditions of use",
        ),
        (3, 0x6986, "command-not-allowed", "許可", "does not allow"),
        (
            3,
            0x6700,
            "wrong-length",
            "SW=6700",
            "Unsupported card or reader error (SW=6700)",
        ),
        (
            3,
            0x6A86,
            "wrong-p1p2",
            "SW=6A86",
            "Unsupported card or reader error (SW=6A86)",
        ),
        (
            3,
            0x6B00,
            "wrong-p1p2",
            "SW=6B00",
            "Unsupported card or reader error (SW=6B00)",
        ),
        (1, 0x6A81, "function-not-supported", "SW=6A81", "(SW=6A81)"),
        (1, 0x6A80, "wrong-data", "SW=6A80", "(SW=6A80)"),
        (1, 0x6A87, "wrong-data", "SW=6A87", "(SW=6A87)"),
        (
            1,
            0x6D00,
            "ins-not-supported",
            "SW=6D00",
            "Unsupported card or reader error (SW=6D00)",
        ),
        (
            1,
            0x6E00,
            "cla-not-supported",
            "SW=6E00",
            "Unsupported card or reader error (SW=6E00)",
        ),
        (
            3,
            0x6F00,
            "no-diagnosis",
            "SW=6F00",
            "Unsupported card or reader error (SW=6F00)",
        ),
        (3, 0x6581, "card-failure", "メモリ", "memory failure"),
        (3, 0x6400, "card-failure", "メモリ", "memory failure"),
        (
            1,
            0x6881,
            "channel-or-sm-unsupported",
            "SW=6881",
            "(SW=6881)",
        ),
        (
            1,
            0x6882,
            "channel-or-sm-unsupported",
            "SW=6882",
            "(SW=6882)",
        ),
        (2, 0x9123, "unknown-sw", "SW=9123", "(SW=9123)"),
        (3, 0x6A88, "unknown-sw", "SW=6A88", "(SW=6A88)"),
    ];
    for &(step, sw, code, ja, en) in cases {
        let mut c = card(respond_at(step, &sw.to_be_bytes()));
        let (r, _) = read(&mut c);
        let e = r.unwrap_err();
        assert_eq!(e.code(), code, "SW {sw:04X} at step {step}");
        assert_eq!(e.sw(), Some(Sw(sw)), "{e:?}");
        assert!(e.message_ja().contains(ja), "{sw:04X}: {}", e.message_ja());
        assert!(e.message_en().contains(en), "{sw:04X}: {}", e.message_en());
        // The read stops at the failing step: no further APDU, no retry loop.
        assert_eq!(c.steps(), step, "SW {sw:04X}");
    }
}

#[test]
fn security_status_never_leads_to_verify() {
    for sw in [0x6982u16, 0x6983, 0x63C3, 0x6300] {
        for step in 1..=3 {
            let mut c = card(respond_at(step, &sw.to_be_bytes()));
            let (r, _) = read(&mut c);
            assert!(r.is_err());
            assert!(!c.received.any_forbidden());
            assert!(c.received.apdus.iter().all(|a| a[1] != 0x20));
        }
    }
}

#[test]
fn warning_6281_6282_is_retried_once() {
    for sw in [0x6281u16, 0x6282] {
        // Once: the retry succeeds, the first answer is discarded.
        let mut c = card(Faults {
            respond_count: 1,
            ..respond_at(3, &id_with_sw(sw))
        });
        let (r, _) = read(&mut c);
        assert_eq!(r.unwrap().as_str(), ID);
        assert_eq!(c.steps(), 4);
        // Twice: error, no third attempt.
        let mut c = card(Faults {
            respond_count: 2,
            ..respond_at(3, &id_with_sw(sw))
        });
        let (r, _) = read(&mut c);
        let e = r.unwrap_err();
        assert_eq!(
            e.code(),
            if sw == 0x6281 {
                "data-corrupted"
            } else {
                "end-of-file"
            }
        );
        assert_eq!(c.steps(), 4);
    }
    // A card whose file is shorter than the ID answers 6282 twice.
    let mut c = EmuCard::new(CardProfile::default(), b"123456789012", Faults::default());
    let (r, _) = read(&mut c);
    assert_eq!(r.unwrap_err().code(), "end-of-file");
}

#[test]
fn more_data_chaining() {
    let mut c = card(Faults {
        more_data: true,
        ..Faults::default()
    });
    let (r, log) = read(&mut c);
    assert_eq!(r.unwrap().as_str(), ID);
    assert_eq!(hex(&c.received.apdus[3]), "00C000000D");
    assert_eq!(log.records().len(), 4);

    // Announcing fewer bytes than there are is legal chaining: 61 05, then
    // five bytes and 61 08, then eight bytes and 9000.
    let mut c = card(Faults {
        more_data: true,
        more_data_announce: Some(5),
        ..Faults::default()
    });
    assert_eq!(read(&mut c).0.unwrap().as_str(), ID);
    assert_eq!(c.steps(), 5);

    // Announced more than delivered, and 6100 (256).
    for xx in [20u8, 0] {
        let mut c = card(Faults {
            more_data: true,
            more_data_announce: Some(xx),
            ..Faults::default()
        });
        let (r, _) = read(&mut c);
        let e = r.unwrap_err();
        assert_eq!(e.code(), "bad-more-data", "61{xx:02X}");
        assert_eq!(e.sw(), Some(Sw(0x6100 | u16::from(xx))));
    }

    // Chained in two pieces.
    let mut s = Scripted::new(&[
        b"\x90\x00",
        b"\x90\x00",
        b"\x61\x06",
        b"123456\x61\x07",
        b"7890123\x90\x00",
    ]);
    let (r, _) = read(&mut s);
    assert_eq!(r.unwrap().as_str(), ID);
    assert_eq!(hex(&s.sent[3]), "00C0000006");
    assert_eq!(hex(&s.sent[4]), "00C0000007");

    // A 61xx chain that never ends stops at the bound.
    let forever: Vec<&[u8]> = std::iter::once(&b"\x90\x00"[..])
        .chain(std::iter::once(&b"\x90\x00"[..]))
        .chain(std::iter::once(&b"\x61\x01"[..]))
        .chain(std::iter::repeat_n(&b"1\x61\x01"[..], 50))
        .collect();
    let mut s = Scripted::new(&forever);
    let (r, _) = read(&mut s);
    assert_eq!(r.unwrap_err().code(), "too-many-exchanges");
    assert!(s.sent.len() <= 2 + MAX_CHAIN);
}

#[test]
fn wrong_le_reissue() {
    let mut c = card(Faults {
        wrong_le: true,
        ..Faults::default()
    });
    let (r, _) = read(&mut c);
    assert_eq!(r.unwrap().as_str(), ID);
    assert_eq!(c.steps(), 4);
    assert_eq!(hex(&c.received.apdus[3]), "00B000000D");

    // Fewer bytes than the ID needs.
    let mut c = card(Faults {
        wrong_le: true,
        wrong_le_value: Some(5),
        ..Faults::default()
    });
    let (r, _) = read(&mut c);
    let e = r.unwrap_err();
    assert_eq!((e.code(), e.sw()), ("bad-wrong-le", Some(Sw(0x6C05))));

    // More bytes than the ID: re-issued, then rejected as trailing bytes.
    let mut s = Scripted::new(&[
        b"\x90\x00",
        b"\x90\x00",
        b"\x6C\x0E",
        b"12345678901234\x90\x00",
    ]);
    let (r, _) = read(&mut s);
    assert_eq!(r.unwrap_err().code(), "trailing-bytes");
    assert_eq!(hex(&s.sent[3]), "00B000000E");

    // 6Cxx forever stops at the bound; 6Cxx on a SELECT is invalid.
    let mut answers: Vec<&[u8]> = vec![b"\x90\x00", b"\x90\x00"];
    answers.extend(std::iter::repeat_n(&b"\x6C\x0D"[..], 50));
    let (r, _) = read(&mut Scripted::new(&answers));
    assert_eq!(r.unwrap_err().code(), "too-many-exchanges");
    let (r, _) = read(&mut Scripted::new(&[b"\x6C\x0D"]));
    assert_eq!(r.unwrap_err().code(), "bad-wrong-le");
}

#[test]
fn malformed_responses() {
    // Shorter than a status word, at every step.
    for step in 1..=3 {
        for raw in [&[][..], &[0x90][..]] {
            let mut c = card(respond_at(step, raw));
            let (r, _) = read(&mut c);
            let e = r.unwrap_err();
            assert_eq!(e.code(), "response-too-short");
            assert!(e.is_tap_again());
        }
    }
    // Too long.
    let big = vec![0x31u8; 300];
    let (r, _) = read(&mut Scripted::new(&[b"\x90\x00", b"\x90\x00", &big]));
    assert_eq!(r.unwrap_err().code(), "response-too-long");
    // Data where a SELECT (P2=0C) must return none.
    let (r, _) = read(&mut Scripted::new(&[b"\x6F\x00\x90\x00"]));
    assert_eq!(r.unwrap_err().code(), "unexpected-data");
    // Truncated and trailing data.
    let (r, _) = read(&mut Scripted::new(&[
        b"\x90\x00",
        b"\x90\x00",
        b"123456789012\x90\x00",
    ]));
    let e = r.unwrap_err();
    assert_eq!(e.code(), "truncated");
    assert!(!format!("{e} {e:?}").contains("123456789012"));
    let mut c = card(Faults {
        trailing_bytes: 2,
        ..Faults::default()
    });
    let (r, _) = read(&mut c);
    assert_eq!(r.unwrap_err().code(), "trailing-bytes");
}

#[test]
fn removal_at_every_step_yields_no_identity() {
    for variant in [
        Faults::default(),
        Faults {
            more_data: true,
            ..Faults::default()
        },
        Faults {
            wrong_le: true,
            ..Faults::default()
        },
    ] {
        let steps = {
            let mut c = card(variant.clone());
            read(&mut c).0.unwrap();
            c.steps()
        };
        for k in 1..=steps {
            let mut c = card(Faults {
                remove_at_step: Some(k),
                ..variant.clone()
            });
            let (r, _) = read(&mut c);
            let e = r.unwrap_err();
            assert!(
                matches!(
                    e,
                    CardError::Transport {
                        source: TransportError::RemovedCard,
                        ..
                    }
                ),
                "{e:?}"
            );
            assert!(e.is_tap_again());
            assert!(e.message_ja().contains("もう一度タッチ"));
            assert!(e.message_en().contains("tap again"));
            assert_eq!(c.steps(), k);
        }
    }
}

#[test]
fn card_data_validation() {
    let bad = |content: &[u8], profile: CardProfile| {
        let mut c = EmuCard::new(profile.clone(), content, Faults::default());
        let e = read_user_id(&mut c, &profile, &ApduLog::new()).unwrap_err();
        let shown = format!("{e} {e:?} {} {}", e.message_ja(), e.message_en());
        (e.code(), shown)
    };
    let ascii = CardProfile::default();
    assert_eq!(bad(b"12345678901a3", ascii.clone()).0, "id-not-digits");
    assert_eq!(bad(b" 234567890123", ascii.clone()).0, "id-not-digits");
    assert_eq!(bad(b"+234567890123", ascii.clone()).0, "id-not-digits");
    assert_eq!(
        bad(
            b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            ascii.clone()
        )
        .0,
        "id-not-digits"
    );
    assert_eq!(bad(b"123456789012\xFF", ascii.clone()).0, "id-bad-encoding");
    let full_width = "１２３４５６７８９０１２３".as_bytes();
    let utf8 = CardProfile {
        length: full_width.len() as u8,
        encoding: Encoding::Utf8,
        ..CardProfile::default()
    };
    // Full-width digits: rejected under ASCII, normalised under UTF-8.
    let mut c = EmuCard::new(utf8.clone(), full_width, Faults::default());
    assert_eq!(
        read_user_id(&mut c, &utf8, &ApduLog::new())
            .unwrap()
            .as_str(),
        ID
    );
    let utf8_13 = CardProfile {
        encoding: Encoding::Utf8,
        ..CardProfile::default()
    };
    assert_eq!(
        bad(b"12345678901\xC3\x28", utf8_13.clone()).0,
        "id-bad-encoding"
    );
    // A 12-digit Individual-Number-shaped value: rejected, never echoed.
    let (code, shown) = bad(b"123456789018 ", utf8_13.clone());
    assert_eq!(code, "id-individual-number-shaped");
    assert!(!shown.contains("123456789018"), "{shown}");
    assert!(shown.contains("individual-number-shaped"));
    // 12 digits with a wrong check digit: just the wrong length.
    assert_eq!(bad(b"123456789017 ", utf8_13).0, "id-wrong-length");
}

#[test]
fn guard_refuses_pin_commands_and_my_number_applications() {
    use GuardViolation as G;
    let refused = [
        ("0020000108", G::PinCommand { ins: 0x20 }),
        ("002000810431323334", G::PinCommand { ins: 0x20 }),
        ("8020000000", G::PinCommand { ins: 0x20 }),
        ("0021000000", G::PinCommand { ins: 0x21 }),
        ("0024000000", G::PinCommand { ins: 0x24 }),
        ("002C000000", G::PinCommand { ins: 0x2C }),
        ("00A4040C0AD3921000310001010408", G::MyNumberApplication),
        ("00A4040C0AD3921000310001010402", G::MyNumberApplication),
        ("00A4040C0AD392F000260100000001", G::MyNumberApplication),
        ("00A4040C0AD3921000310001010401", G::MyNumberApplication),
        ("00A4040009D39210003100010104", G::MyNumberApplication),
        ("00A4040C02D392", G::MyNumberApplication),
        ("00A4040C0AD392100031000101040800", G::MyNumberApplication),
        (
            "00A4080C020001",
            G::NotAllowed {
                ins: 0xA4,
                p1: 0x08,
            },
        ),
        (
            "00B0810000",
            G::NotAllowed {
                ins: 0xB0,
                p1: 0x81,
            },
        ),
        (
            "00D6000001FF",
            G::NotAllowed {
                ins: 0xD6,
                p1: 0x00,
            },
        ),
        (
            "0084000008",
            G::NotAllowed {
                ins: 0x84,
                p1: 0x00,
            },
        ),
        ("00A4", G::Malformed { len: 2 }),
        ("00A4040C", G::Malformed { len: 4 }),
        ("00A4040C05F04B", G::Malformed { len: 7 }),
    ];
    for (apdu, want) in refused {
        let bytes = super::profile::parse_hex("apdu", apdu).unwrap();
        assert_eq!(ApduGuard::check(&bytes), Err(want), "{apdu}");
    }
    for ok in [
        "00A4040C08F04B495A554E4101",
        "00A4020C020001",
        "00B000000D",
        "00C000000D",
    ] {
        let bytes = super::profile::parse_hex("apdu", ok).unwrap();
        assert_eq!(ApduGuard::check(&bytes), Ok(()), "{ok}");
    }
}

#[test]
fn guard_stops_forbidden_profiles_before_the_transport() {
    // Profile validation would refuse these; build them by hand to prove
    // the session's guard holds on its own.
    for aid in [MY_NUMBER_TEXT_AP, MY_NUMBER_FACE_AP, JPKI_AP] {
        let profile = CardProfile {
            aid: aid.to_vec(),
            ..CardProfile::default()
        };
        assert!(profile.validate().is_err());
        let log = ApduLog::new();
        let e = read_user_id(&mut MustNotSend, &profile, &log).unwrap_err();
        assert_eq!(e.code(), "apdu-refused");
        assert!(matches!(
            e,
            CardError::Refused {
                violation: GuardViolation::MyNumberApplication,
                ..
            }
        ));
        let records = log.records();
        assert_eq!(records.len(), 1);
        assert!(!records[0].sent);
        assert_eq!(hex(&records[0].header), "00A4040C");
    }
}

#[test]
fn apdu_log_keeps_headers_only_and_writes_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apdu.log");
    let log = ApduLog::with_file(&path).unwrap();
    let mut c = EmuCard::with_user_id(ID);
    read_user_id(&mut c, &CardProfile::default(), &log).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        "select-app 00A4040C\nselect-file 00A4020C\nread-binary 00B00000\n"
    );
    assert!(!text.contains("F04B495A"));
    assert!(!text.contains(ID));
}

#[test]
fn pcsc_errors_map_to_distinct_messages() {
    use pcsc::Error as E;
    let cases = [
        (E::NoService, TransportError::NoService),
        (E::ServiceStopped, TransportError::ServiceStopped),
        (E::NoReadersAvailable, TransportError::NoReadersAvailable),
        (E::UnknownReader, TransportError::UnknownReader),
        (E::ReaderUnavailable, TransportError::ReaderUnavailable),
        (E::RemovedCard, TransportError::RemovedCard),
        (E::ResetCard, TransportError::ResetCard),
        (E::UnresponsiveCard, TransportError::UnresponsiveCard),
        (E::UnpoweredCard, TransportError::UnpoweredCard),
        (E::UnsupportedCard, TransportError::UnsupportedCard),
        (E::NoSmartcard, TransportError::NoSmartcard),
        (E::Timeout, TransportError::Timeout),
        (E::SharingViolation, TransportError::SharingViolation),
        (E::CommError, TransportError::CommError),
        (E::ProtoMismatch, TransportError::ProtocolMismatch),
        (E::InsufficientBuffer, TransportError::InsufficientBuffer),
        (E::Cancelled, TransportError::Cancelled),
        (E::ServerTooBusy, TransportError::ServiceBusy),
        (
            E::InternalError,
            TransportError::Other {
                code: E::InternalError as u32,
            },
        ),
    ];
    let mut codes = BTreeSet::new();
    for (pcsc_err, want) in cases {
        let got = map_pcsc(pcsc_err);
        assert_eq!(got, want);
        assert!(!got.message_ja().is_empty() && !got.message_en().is_empty());
        codes.insert(got.code());
    }
    assert_eq!(codes.len(), cases.len());
    assert!(TransportError::SharingViolation
        .message_en()
        .contains("Another application"));
    assert!(TransportError::NoService.message_ja().contains("pcscd"));
    assert!(TransportError::RemovedCard.is_tap_again());
    assert!(TransportError::NoService.is_service_or_reader_lost());
}

/// The number of distinct failure cases with their own code and message.
#[test]
fn error_catalogue_is_complete_and_distinct() {
    let step = Step::ReadBinary;
    let sw = Sw(0x6A86);
    let status_kinds = [
        StatusKind::NoMunicipalApp,
        StatusKind::NoIdFile,
        StatusKind::SecurityNotSatisfied,
        StatusKind::AuthBlocked,
        StatusKind::VerificationFailed { retries: Some(1) },
        StatusKind::DataInvalidated,
        StatusKind::ConditionsNotSatisfied,
        StatusKind::CommandNotAllowed,
        StatusKind::WrongLength,
        StatusKind::WrongP1P2,
        StatusKind::FunctionNotSupported,
        StatusKind::WrongData,
        StatusKind::InsNotSupported,
        StatusKind::ClaNotSupported,
        StatusKind::NoDiagnosis,
        StatusKind::DataCorrupted,
        StatusKind::EndOfFile,
        StatusKind::CardFailure,
        StatusKind::ChannelOrSmUnsupported,
        StatusKind::Unknown,
    ];
    let protocol_kinds = [
        ProtocolKind::ResponseTooShort { len: 1 },
        ProtocolKind::ResponseTooLong { len: 300 },
        ProtocolKind::BadMoreData { sw: Sw(0x6120) },
        ProtocolKind::BadWrongLe { sw: Sw(0x6C05) },
        ProtocolKind::TooManyExchanges,
        ProtocolKind::UnexpectedData { len: 2 },
        ProtocolKind::Truncated { got: 1, want: 13 },
        ProtocolKind::TrailingBytes { got: 14, want: 13 },
    ];
    let transport = [
        TransportError::NoService,
        TransportError::ServiceStopped,
        TransportError::NoReadersAvailable,
        TransportError::UnknownReader,
        TransportError::ReaderUnavailable,
        TransportError::RemovedCard,
        TransportError::ResetCard,
        TransportError::UnresponsiveCard,
        TransportError::UnpoweredCard,
        TransportError::UnsupportedCard,
        TransportError::NoSmartcard,
        TransportError::Timeout,
        TransportError::SharingViolation,
        TransportError::CommError,
        TransportError::ProtocolMismatch,
        TransportError::InsufficientBuffer,
        TransportError::Cancelled,
        TransportError::ServiceBusy,
        TransportError::Other { code: 1 },
    ];
    let ids = [
        UserIdError::Empty,
        UserIdError::WrongLength { len: 3 },
        UserIdError::NotDigits,
        UserIdError::IndividualNumberShaped,
        UserIdError::BadEncoding { encoding: "ASCII" },
    ];
    let mut all: Vec<CardError> = Vec::new();
    all.extend(
        status_kinds
            .iter()
            .map(|&kind| CardError::Status { step, sw, kind }),
    );
    all.extend(
        protocol_kinds
            .iter()
            .map(|&kind| CardError::Protocol { step, kind }),
    );
    all.extend(
        transport
            .iter()
            .map(|&source| CardError::Transport { step, source }),
    );
    all.extend(ids.iter().map(|&source| CardError::InvalidId { source }));
    all.push(CardError::Refused {
        step,
        violation: GuardViolation::PinCommand { ins: 0x20 },
    });
    all.push(CardError::ReaderNotFound { name: "x".into() });
    all.push(CardError::NoCard { waited_ms: 1 });
    let codes: BTreeSet<&str> = all.iter().map(|e| e.code()).collect();
    assert_eq!(codes.len(), all.len(), "codes must be distinct");
    for e in &all {
        assert!(
            !e.message_ja().is_empty() && !e.message_en().is_empty(),
            "{e:?}"
        );
        assert!(!e.to_string().is_empty());
    }
    assert_eq!(all.len(), 55);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random answers never panic, never loop without bound, and a success
    /// is always a valid 13-digit ID.
    #[test]
    fn random_responses_never_panic(answers in proptest::collection::vec(
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..4),
            proptest::collection::vec(any::<u8>(), 0..300),
            (proptest::collection::vec(b'0'..=b'9', 0..16), any::<u16>()).prop_map(|(mut d, sw)| { d.extend_from_slice(&sw.to_be_bytes()); d }),
            (any::<u8>(), prop_oneof![Just(0x61u8), Just(0x6C), Just(0x62), Just(0x90)]).prop_map(|(x, s)| vec![s, x]),
        ],
        0..24,
    )) {
        let refs: Vec<&[u8]> = answers.iter().map(|a| a.as_slice()).collect();
        let mut s = Scripted::new(&refs);
        let log = ApduLog::new();
        let r = read_user_id(&mut s, &CardProfile::default(), &log);
        prop_assert!(s.sent.len() <= 3 * MAX_CHAIN + 1);
        prop_assert!(s.sent.iter().all(|a| ApduGuard::check(a).is_ok()));
        if let Ok(id) = r {
            prop_assert_eq!(id.as_str().len(), 13);
            prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_digit()));
        }
    }

    /// Any APDU with a PIN instruction is refused, whatever else it holds.
    #[test]
    fn pin_instructions_always_refused(cla in any::<u8>(), ins in prop_oneof![Just(0x20u8), Just(0x21), Just(0x24), Just(0x2C)], rest in proptest::collection::vec(any::<u8>(), 2..40)) {
        let mut apdu = vec![cla, ins];
        apdu.extend(rest);
        prop_assert!(ApduGuard::check(&apdu).is_err());
    }

    /// Any SELECT naming a My Number AID (as prefix or extension) is refused.
    #[test]
    fn my_number_selects_always_refused(which in 0..3usize, cut in 1..=10usize, tail in proptest::collection::vec(any::<u8>(), 0..6), p2 in any::<u8>()) {
        let aid = [MY_NUMBER_TEXT_AP, MY_NUMBER_FACE_AP, JPKI_AP][which];
        // Prefixes of at least 5 bytes (shorter ones are caught by the
        // prefix rule too, but may legitimately be another registration).
        let mut data = aid[..cut.max(5)].to_vec();
        if cut == 10 { data.extend(tail); }
        let mut apdu = vec![0x00, 0xA4, 0x04, p2, data.len() as u8];
        apdu.extend(data);
        prop_assert_eq!(ApduGuard::check(&apdu), Err(GuardViolation::MyNumberApplication));
    }
}
