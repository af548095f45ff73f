//! The bodies of the fuzz targets, shared by `cargo fuzz` (this file is
//! the fuzz package's library, `bodies`; each file in `fuzz_targets/` is
//! one line calling a function here) and by the normal
//! test suite (`node/tests/it/fuzz_regressions.rs` includes this file and
//! replays every committed input under `fuzz/regressions/<target>/` and
//! `fuzz/seeds/<target>/`), so a crasher, once committed, is checked by
//! `cargo nextest` on stable forever.
//!
//! Every body must return normally for any input: a panic is the bug.
//! Where a cheap property exists it is asserted too (round trips, the
//! Individual-Number guard against an independent reference).

use std::sync::OnceLock;

/// Run once by every target before its first input (`fuzz_target!`'s
/// `init`). libfuzzer-sys installs a panic hook that aborts at once, so
/// without this a panic inside Automerge that `crdt::doc::guard` catches,
/// as the node does (the document is quarantined, the peer cut off),
/// would count as a crash. Panics raised in Automerge's own code (its
/// crates `automerge` and `hexane`) are left to unwind, silently: caught by
/// the guard they are the handled case; escaping it they still abort,
/// because libfuzzer-sys aborts on any panic that leaves the target.
/// Every other panic goes to libfuzzer-sys's hook as before.
pub fn under_libfuzzer() {
    let aborting = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_automerge = info.location().is_some_and(|l| {
            let f = l.file();
            f.contains("/automerge-") || f.contains("/hexane-")
        });
        if !in_automerge {
            aborting(info);
        }
    }));
}

/// Every target: name and body. The regression test walks this list.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("sync_frame", sync_frame),
    ("automerge_doc", automerge_doc),
    ("domain_text", domain_text),
    ("apdu", apdu),
    ("config", config),
    ("crl", crl),
    ("csv_import", csv_import),
    ("api_body", api_body),
];

/// Sync frames: decoding never panics, and whatever decodes re-encodes
/// to bytes that decode to the same frame.
pub fn sync_frame(data: &[u8]) {
    if let Ok(f) = crdt::wire::decode(data) {
        let bytes = crdt::wire::encode(&f).expect("a decoded frame re-encodes");
        let again = crdt::wire::decode(&bytes).expect("re-encoded frame decodes");
        assert_eq!(
            format!("{again:?}"),
            format!("{f:?}"),
            "frame round trip changed the frame"
        );
    }
}

/// Automerge bytes through our wrapper: as a snapshot, as a change to
/// apply, and both; a document that loads is read by every view without
/// panicking (errors are fine).
pub fn automerge_doc(data: &[u8]) {
    use crdt::{DocKey, Kind};
    let (first, rest) = data.split_at(data.len().min(1));
    let kind = Kind::ALL[usize::from(first.first().copied().unwrap_or(0)) % Kind::ALL.len()];
    let key = DocKey::new(kind, "fuzz").expect("a valid key");
    // Split the rest into a snapshot part and change parts at 0xFF 0xFE.
    let mut parts: Vec<Vec<u8>> = rest.split(|b| *b == 0xFE).map(|p| p.to_vec()).collect();
    let snapshot = parts.remove(0);
    for (snap, changes) in [
        (Some(rest), &[][..]),
        (None, &[rest.to_vec()][..]),
        (Some(&snapshot[..]), &parts[..]),
    ] {
        if let Ok(doc) = crdt::doc::Doc::load(key.clone(), snap, changes) {
            let _ = crdt::views::validate(&doc);
            let _ = crdt::views::medical(&doc);
            let _ = crdt::views::audit(&doc);
            let _ = crdt::views::outbox(&doc);
            let _ = crdt::views::contacts(&doc);
            let _ = crdt::derive::projection(&doc);
        }
    }
}

/// An independent, narrower reference for the Individual-Number guard:
/// NFKC-fold and split at ASCII white space; a token made only of ASCII
/// digits and hyphens is a group of numbers, any other token is ignored;
/// consecutive such tokens whose digits number exactly twelve and pass
/// the check digit are an Individual Number ("1234 5678 9018",
/// "1234-5678-9018"). Whatever it finds, the guard must find. It ignores
/// what the guard reads on purpose (digits glued to other digits by full
/// stops, slashes or kanji numerals form one word there, never split, so
/// a 13-digit card ID or a date range is not read as a number).
fn reference_contains_in(text: &str) -> bool {
    use unicode_normalization::UnicodeNormalization;
    let folded: String = text.nfkc().collect();
    let groups: Vec<Option<String>> = folded
        .split_ascii_whitespace()
        .map(|t| {
            t.chars()
                .all(|c| c.is_ascii_digit() || c == '-')
                .then(|| t.chars().filter(char::is_ascii_digit).collect())
        })
        .collect();
    for (i, first) in groups.iter().enumerate() {
        let mut digits = String::new();
        for g in groups[i..].iter() {
            let Some(g) = g else { break };
            digits.push_str(g);
            if digits.len() >= 12 {
                break;
            }
        }
        if first.is_some() && digits.len() == 12 && crdt::text::is_individual_number(&digits) {
            return true;
        }
    }
    false
}

/// Domain validation and the Individual-Number guard: `check_text` never
/// lets an Individual Number through (per the reference above), card user
/// IDs are exactly 13 ASCII digits after parsing, e-mail and search-key
/// helpers never panic, and typed values deserialised from the input
/// validate without panicking.
pub fn domain_text(data: &[u8]) {
    use crdt::model::Validate;
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // The guard may refuse what the reference passes
    // ("１２３４５６.７８９０１８"), never the other way round.
    let guard = crdt::text::contains_individual_number(s);
    assert!(
        guard || !reference_contains_in(s),
        "the guard lets through an Individual Number the reference finds"
    );
    if crdt::text::check_text("fuzz", s, 10_000, false).is_ok() {
        assert!(
            !reference_contains_in(s),
            "an Individual Number passed check_text"
        );
    }
    if let Ok(id) = crdt::text::CardUserId::parse(s) {
        let v = id.as_str();
        assert!(
            v.len() == 13 && v.bytes().all(|b| b.is_ascii_digit()),
            "card id"
        );
    }
    let _ = crdt::text::check_email("email", s);
    let _ = crdt::text::search_key(s);
    let _ = crdt::text::needs_review(s);
    if let Ok(m) = serde_json::from_str::<crdt::model::Member>(s) {
        let _ = m.validate();
    }
    if let Ok(c) = serde_json::from_str::<crdt::model::FamilyContact>(s) {
        let _ = c.validate();
    }
    if let Ok(sh) = serde_json::from_str::<crdt::model::ShelterInfo>(s) {
        let _ = sh.validate();
    }
}

/// A card that answers with the fuzzer's bytes: the first byte picks the
/// profile length, the rest is split into responses at 0xFF 0x00.
struct ScriptedCard {
    responses: std::collections::VecDeque<Vec<u8>>,
}

impl node::card::apdu::Transmit for ScriptedCard {
    fn transmit(&mut self, _apdu: &[u8]) -> Result<Vec<u8>, node::card::apdu::TransportError> {
        Ok(self.responses.pop_front().unwrap_or_default())
    }
}

/// The APDU/TLV side of a card read: a whole read against a scripted card
/// (status words, 61xx/6Cxx chains, truncated and over-long answers), and
/// the ID decoder and the command guard on raw bytes. A user ID that comes
/// out is 13 ASCII digits.
pub fn apdu(data: &[u8]) {
    use node::card::apdu;
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let profile = node::card::profile::CardProfile {
        length: len % 32,
        ..Default::default()
    };
    let mut responses = std::collections::VecDeque::new();
    let mut cur = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == 0xFF && rest.get(i + 1) == Some(&0x00) {
            responses.push_back(std::mem::take(&mut cur));
            i += 2;
        } else {
            cur.push(rest[i]);
            i += 1;
        }
    }
    responses.push_back(cur);
    let mut card = ScriptedCard { responses };
    let log = apdu::ApduLog::new();
    if let Ok(id) = apdu::read_user_id(&mut card, &profile, &log) {
        let v = id.to_string();
        assert!(
            v.len() == 13 && v.bytes().all(|b| b.is_ascii_digit()),
            "user id"
        );
    }
    let _ = apdu::decode_user_id(&profile, rest);
    let _ = apdu::ApduGuard::check(rest);
}

/// Config parsing: any text either parses into a validated config or is
/// refused with an error; never a panic.
pub fn config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = node::config::Config::parse(s, std::path::Path::new("fuzz.toml"));
}

/// A fixed municipal CA for the CRL target (made once per process).
fn crl_state() -> &'static certs::crl::RevocationState {
    static STATE: OnceLock<certs::crl::RevocationState> = OnceLock::new();
    STATE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kizuna-fuzz-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        certs::ca::init_ca(&dir, "Fuzz CA").expect("a CA");
        let pem = std::fs::read(dir.join(certs::ca::CA_CERT_FILE)).expect("CA cert");
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem).expect("CA PEM");
        let _ = std::fs::remove_dir_all(&dir);
        certs::crl::RevocationState::new(der)
    })
}

/// Revocation-list ingestion: hostile DER offered as if by a peer is
/// refused or, if it were ever accepted, only with a number higher than
/// the held one.
pub fn crl(data: &[u8]) {
    let st = crl_state();
    let _ = certs::crl::RevocationList::parse(data, st.ca_cert().as_ref());
    let _ = st.offer(data);
}

/// CSV import: decoding (UTF-8, BOM, CP932, auto) and the row parsers of
/// the registry and every municipal data set. The first byte picks the
/// data set.
pub fn csv_import(data: &[u8]) {
    use node::import::{self, datasets, Encoding};
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let enc = [Encoding::Utf8, Encoding::Cp932, Encoding::Auto][usize::from(which % 3)];
    let Ok((_, lines)) = import::decode(body, enc) else {
        return;
    };
    let now = 1_780_000_000_000;
    match which % 5 {
        0 => {
            let _ = import::parse_lines(&lines, now);
        }
        1 => {
            let _ = import::parse::<datasets::ShelterRows>(&lines, now);
        }
        2 => {
            let _ = import::parse::<datasets::ContactRows>(&lines, now);
        }
        3 => {
            let _ = import::parse::<datasets::MedicalRows>(&lines, now);
        }
        _ => {
            let _ = import::parse::<datasets::EligibilityRows>(&lines, now);
        }
    }
    for l in &lines {
        let _ = import::split_csv(l);
    }
}

/// A real hq node's HTTP API (router, extractors, engine, SQLite store) on
/// loopback, made once per process, and its bearer token.
struct Api {
    addr: std::net::SocketAddr,
    token: String,
}

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kizuna-fuzz-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = node::store::SqliteStore::open(&dir.join(node::store::DB_FILE_NAME)).unwrap();
        let id = crdt::NodeId::new("hq-fuzz").unwrap();
        let driver = node::driver::Driver::start(
            store,
            crdt::engine::EngineConfig::for_tests(id, crdt::Role::Hq),
        )
        .unwrap();
        let token = node::auth::Operators::add(&dir, "fuzz").unwrap();
        let state = node::api::ApiState::new(driver, dir.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                node::api::serve(l, state, std::future::pending())
                    .await
                    .unwrap();
            });
        });
        Api {
            addr: rx.recv().unwrap(),
            token,
        }
    })
}

/// Endpoints that take a request body.
const BODY_ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/checkins"),
    ("POST", "/api/v1/checkouts"),
    ("POST", "/api/v1/persons"),
    ("POST", "/api/v1/persons/p0000001/medical"),
    ("POST", "/api/v1/shelters"),
    ("PATCH", "/api/v1/shelters/s-01"),
    ("PUT", "/api/v1/persons/p0000001/contacts"),
    ("PUT", "/api/v1/persons/p0000001/eligibility"),
];

/// API request bodies: hostile bytes as the body of every endpoint that
/// takes one. The answer is a complete HTTP response with a 2xx or 4xx
/// status: a 5xx, a dropped connection or a hang is the bug.
pub fn api_body(data: &[u8]) {
    use std::io::{Read, Write};
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let (method, path) = BODY_ROUTES[usize::from(which) % BODY_ROUTES.len()];
    let a = api();
    let mut s = std::net::TcpStream::connect(a.addr).expect("connect to the API");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        a.token,
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("a complete response");
    let text = String::from_utf8_lossy(&resp);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    assert!(status < 500, "{method} {path}: {status}: {text}");
}
