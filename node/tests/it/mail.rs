//! Family mail against a real SMTP server process
//! (deploy/scripts/smtp-test-server.py, python3-aiosmtpd): the
//! `node::mail` sender in every fault mode (G-1..G-4), and end to end
//! through an hq `kizuna run` node (check-in → mail file; drop after the
//! final "." → indeterminate, retried with the same Message-ID).

use crate::support::{free_port, free_udp_port, kizuna_bin};
use crdt::api::{MailOutcome, MailRequest};
use node::mail::{send, SmtpSettings};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn python() -> &'static str {
    // The Debian package installs into the system python.
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/scripts/smtp-test-server.py")
}

struct Smtpd {
    child: Child,
    port: u16,
}

/// Switches a server started with `--mode-file PATH` to `mode` for its
/// next messages. The server keeps its port: stopping one server and
/// starting another on the same port leaves a window in which any other
/// process (another test's server or node picking a free port) can take
/// it. Written whole, then renamed, so the server never reads half a mode.
fn switch_mode(file: &Path, mode: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, mode).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

impl Smtpd {
    fn start(mode: &str, port: u16, dir: Option<&Path>, extra: &[&str]) -> Smtpd {
        let mut cmd = Command::new(python());
        cmd.arg(script()).arg(mode).arg(port.to_string());
        if let Some(d) = dir {
            cmd.arg("--dir").arg(d);
        }
        // Its stderr is kept: a server that fails to start (a port taken,
        // a missing module) says why in the panic below.
        let err_log = tempfile::NamedTempFile::new().unwrap();
        let mut child = cmd
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(err_log.reopen().unwrap())
            .spawn()
            .expect("start smtp-test-server.py");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let stderr = || std::fs::read_to_string(err_log.path()).unwrap_or_default();
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
            panic!(
                "smtp-test-server.py did not get ready within 20 s (is python3-aiosmtpd installed? deploy/scripts/setup.sh): {}",
                stderr()
            )
        });
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("smtp-test-server.py: {line:?}: {}", stderr()));
        Smtpd { child, port }
    }
    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Smtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn req() -> MailRequest {
    MailRequest {
        message_id: "<0123456789abcdef@safety.kizuna.invalid>".into(),
        to: "family@例え.jp".into(),
        subject: "【安否情報】避難所に到着しました".into(),
        body: "山田 太郎 さんは無事に避難所に到着しました。\n.dot line\n".into(),
        person_id: "p1".into(),
        contact_id: "c1".into(),
    }
}

fn settings(port: u16) -> SmtpSettings {
    let mut s = SmtpSettings::new("127.0.0.1", port, "kizuna@example.jp");
    s.connect_timeout = Duration::from_secs(5);
    s.reply_timeout = Duration::from_secs(2);
    s.data_timeout = Duration::from_secs(2);
    s
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn mail_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn header(mail: &str, name: &str) -> Option<String> {
    // Unfolds continuation lines.
    let head = mail.split("\r\n\r\n").next()?;
    let mut out: Option<String> = None;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(o) = out.as_mut() {
                o.push_str(line);
            }
            continue;
        }
        if out.is_some() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case(name) {
                out = Some(v.trim().to_string());
            }
        }
    }
    out
}

/// Decodes RFC 2047 encoded-words (B and Q, UTF-8) as lettre writes them.
fn decode_2047(v: &str) -> String {
    let mut out = String::new();
    for word in v.split_whitespace() {
        let Some(inner) = word.strip_prefix("=?").and_then(|w| w.strip_suffix("?=")) else {
            out.push_str(word);
            continue;
        };
        let mut parts = inner.splitn(3, '?');
        let (_cs, enc, text) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let bytes = if enc.eq_ignore_ascii_case("b") {
            b64(text)
        } else {
            let mut b = Vec::new();
            let t = text.as_bytes();
            let mut i = 0;
            while i < t.len() {
                match t[i] {
                    b'_' => b.push(b' '),
                    b'=' => {
                        b.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                        i += 2;
                    }
                    c => b.push(c),
                }
                i += 1;
            }
            b
        };
        out.push_str(&String::from_utf8(bytes).unwrap());
    }
    out
}

fn b64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            _ => 63,
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

#[test]
fn accept_stores_exact_message_id_and_utf8_subject() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Smtpd::start("accept", 0, Some(dir.path()), &[]);
    let r = req();
    let out = rt().block_on(send(&settings(srv.port), &r));
    assert_eq!(out, MailOutcome::Sent);
    let files = mail_files(dir.path());
    assert_eq!(files.len(), 1);
    let mail = String::from_utf8(std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(
        header(&mail, "Message-ID").as_deref(),
        Some(r.message_id.as_str())
    );
    assert_eq!(decode_2047(&header(&mail, "Subject").unwrap()), r.subject);
    assert_eq!(
        header(&mail, "To").as_deref(),
        Some("family@xn--r8jz45g.jp")
    );
    assert!(header(&mail, "Content-Type")
        .unwrap()
        .to_ascii_lowercase()
        .contains("charset=utf-8"));
}

#[test]
fn tempfail_is_transient() {
    let srv = Smtpd::start("tempfail", 0, None, &[]);
    match rt().block_on(send(&settings(srv.port), &req())) {
        MailOutcome::Transient(r) => assert!(r.contains("451"), "{r}"),
        o => panic!("{o:?}"),
    }
}

#[test]
fn permfail_is_permanent_with_the_reason() {
    let srv = Smtpd::start("permfail", 0, None, &[]);
    match rt().block_on(send(&settings(srv.port), &req())) {
        MailOutcome::Permanent(r) => {
            assert!(
                r.contains("550") && r.contains("mailbox unavailable"),
                "{r}"
            )
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn drop_after_data_is_indeterminate() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Smtpd::start("drop-after-data", 0, Some(dir.path()), &[]);
    match rt().block_on(send(&settings(srv.port), &req())) {
        MailOutcome::Indeterminate(_) => {}
        o => panic!("{o:?}"),
    }
    // The server did get the whole message: a retry is a possible duplicate.
    assert_eq!(mail_files(dir.path()).len(), 1);
}

#[test]
fn server_not_running_is_transient() {
    // A port bound but not listening: connections are refused, and no
    // other process can start listening on it while the test holds it
    // (a port probed and released could be taken by another test's server).
    let rt = rt();
    let _held = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        s
    });
    let port = _held.local_addr().unwrap().port();
    match rt.block_on(send(&settings(port), &req())) {
        MailOutcome::Transient(r) => assert!(r.contains("refused"), "{r}"),
        o => panic!("{o:?}"),
    }
    // DNS failure (.invalid never resolves).
    let mut s = settings(port);
    s.host = "smtp.kizuna.invalid".into();
    match rt.block_on(send(&s, &req())) {
        MailOutcome::Transient(_) => {}
        o => panic!("{o:?}"),
    }
}

#[test]
fn slow_greeting_is_transient_slow_final_reply_is_indeterminate() {
    let srv = Smtpd::start("slow", 0, None, &["--delay", "10", "--slow-phase", "all"]);
    // The server would answer after 10 s; a Transient "greeting" outcome
    // (instead of Sent) shows the phase timeout cut it short. No clock is
    // asserted.
    match rt().block_on(send(&settings(srv.port), &req())) {
        MailOutcome::Transient(r) => assert!(r.contains("greeting"), "{r}"),
        o => panic!("{o:?}"),
    }
    srv.stop();
    let dir = tempfile::tempdir().unwrap();
    let srv = Smtpd::start(
        "slow",
        0,
        Some(dir.path()),
        &["--delay", "10", "--slow-phase", "data"],
    );
    match rt().block_on(send(&settings(srv.port), &req())) {
        MailOutcome::Indeterminate(r) => assert!(r.contains("final"), "{r}"),
        o => panic!("{o:?}"),
    }
}

#[test]
fn control_characters_are_refused_permanently() {
    let mut r = req();
    r.subject = "件名\r\nBcc: attacker@example.jp".into();
    // No server needed: refused before connecting.
    match rt().block_on(send(&settings(1), &r)) {
        MailOutcome::Permanent(_) => {}
        o => panic!("{o:?}"),
    }
}

// ----- end to end through `kizuna run` --------------------------------------

fn kizuna() -> Command {
    let mut c = Command::new(kizuna_bin());
    c.env("RUST_LOG", "info");
    c
}

fn http(port: u16, token: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Some((code, body))
}

fn status(port: u16, token: &str) -> Option<serde_json::Value> {
    let (code, body) = http(port, token, "GET", "/api/v1/status", "")?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

fn poll<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Node(Child);
impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `kizuna run --config DIR/kizuna.toml` with the config `cfg`
/// gives for an HTTP and a QUIC port, and waits (up to 60 s) until its API
/// answers `token`: returns the node and its HTTP port. The ports are
/// probed free and released before the node binds them (the config takes
/// no port 0), so another process can take one in between; the node then
/// exits with "Address already in use", and only then is it started again
/// on newly probed ports (at most 5 times). Any other exit fails the test
/// with the node's log.
fn start_node(dir: &Path, token: &str, cfg: impl Fn(u16, u16) -> String) -> (Node, u16) {
    let log_path = dir.join("kizuna.log");
    for _attempt in 0..5 {
        let (http_port, quic_port) = (free_port(), free_udp_port());
        std::fs::write(dir.join("kizuna.toml"), cfg(http_port, quic_port)).unwrap();
        let log = std::fs::File::create(&log_path).unwrap();
        let mut node = Node(
            kizuna()
                .args(["run", "--config"])
                .arg(dir.join("kizuna.toml"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if status(http_port, token).is_some() {
                return (node, http_port);
            }
            if let Ok(Some(st)) = node.0.try_wait() {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                assert!(
                    text.contains("Address already in use"),
                    "hq exited ({st}): {text}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "hq did not answer: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("hq found no free port in 5 attempts");
}

#[test]
fn hq_node_sends_on_check_in_and_retries_indeterminate_with_the_same_message_id() {
    use crdt::store::Store;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mail_dir = root.join("mail");
    // PKI and hq data: registry, a shelter, family contacts for persons
    // 0 and 3 (node::demo::put_demo_profiles gives every third a contact).
    let ca = root.join("ca");
    certs::ca::init_ca(&ca, "Mail Test CA").unwrap();
    let hq = root.join("hq");
    let hq_id = crdt::NodeId::new("hq-1").unwrap();
    certs::ca::issue(&ca, crdt::Role::Hq, &hq_id, &hq.join("certs"), 30).unwrap();
    let data = hq.join("data");
    let csv = root.join("registry.csv");
    std::fs::write(&csv, node::demo::synthetic_registry(6, 3)).unwrap();
    let st = kizuna()
        .args(["registry", "import", "--data-dir"])
        .arg(&data)
        .arg(&csv)
        .args(["--node-id", "hq-1"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    node::demo::put_shelters(&data, "hq-1", &[("shelter-01", "三条小学校")]).unwrap();
    node::demo::put_demo_profiles(&data, "hq-1", 4).unwrap();
    let ids: Vec<String> =
        node::store::SqliteStore::open_readonly(&data.join(node::store::DB_FILE_NAME))
            .unwrap()
            .persons(4, 0)
            .unwrap()
            .into_iter()
            .map(|p| p.person_id)
            .collect();
    assert_eq!(ids.len(), 4);
    let token = node::auth::Operators::add(&data, "test").unwrap();
    let mid = |p: &str| {
        crdt::engine::Engine::<node::store::SqliteStore>::message_id(p, &format!("c-{p}"))
    };

    // One server for the whole test, switched between modes through a
    // file instead of restarted on the same port.
    let mode_file = root.join("smtp-mode");
    let smtpd = Smtpd::start(
        "accept",
        0,
        Some(&mail_dir),
        &["--mode-file", mode_file.to_str().unwrap()],
    );
    let smtp_port = smtpd.port;
    let (_node, http_port) = start_node(&hq, &token, |http_port, quic_port| {
        format!(
            "data_dir = \"data\"\n[certs]\ndir = \"certs\"\n[net]\nlisten = \"127.0.0.1:{quic_port}\"\nmdns = false\n[http]\nbind = \"127.0.0.1:{http_port}\"\n[smtp]\nhost = \"127.0.0.1\"\nport = {smtp_port}\nfrom = \"kizuna@example.jp\"\ntls = \"none\"\ntimeout_secs = 3\ndata_timeout_secs = 3\n"
        )
    });

    // 1. Accepting server: exactly one mail, with the engine's Message-ID.
    let check_in = |p: &str| {
        let (code, body) = http(
            http_port,
            &token,
            "POST",
            "/api/v1/checkins",
            &format!("{{\"person_ids\":[\"{p}\"],\"shelter_id\":\"shelter-01\"}}"),
        )
        .unwrap();
        assert_eq!(code, 201, "{body}");
    };
    check_in(&ids[0]);
    poll("first mail file", 30, || {
        (mail_files(&mail_dir).len() == 1).then_some(())
    });
    poll("empty mail queue", 30, || {
        let s = status(http_port, &token)?;
        (s["mail_queue"] == 0).then_some(())
    });
    let files = mail_files(&mail_dir);
    assert_eq!(files.len(), 1, "exactly one mail");
    let first = String::from_utf8(std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(header(&first, "Message-ID").unwrap(), mid(&ids[0]));
    assert_eq!(
        header(&first, "To").unwrap(),
        format!("family-{}@example.jp", ids[0])
    );
    assert!(decode_2047(&header(&first, "Subject").unwrap()).starts_with("【安否情報】"));
    let before = status(http_port, &token).unwrap()["duplicate_mail_risk"]
        .as_u64()
        .unwrap();

    // 2. The server drops the connection after the final ".": the state
    //    becomes indeterminate (duplicate risk counted), and the retry
    //    30 s later carries the same Message-ID.
    switch_mode(&mode_file, "drop-after-data");
    check_in(&ids[3]);
    poll("indeterminate outcome", 30, || {
        let s = status(http_port, &token)?;
        (s["duplicate_mail_risk"].as_u64()? == before + 1 && s["mail_queue"] == 1).then_some(())
    });
    assert_eq!(mail_files(&mail_dir).len(), 2, "the dropped server got it");
    switch_mode(&mode_file, "accept");
    poll("retried mail", 90, || {
        (mail_files(&mail_dir).len() == 3).then_some(())
    });
    poll("empty mail queue after the retry", 30, || {
        let s = status(http_port, &token)?;
        (s["mail_queue"] == 0).then_some(())
    });
    let files = mail_files(&mail_dir);
    let ids_seen: Vec<String> = files
        .iter()
        .map(|f| {
            header(
                &String::from_utf8(std::fs::read(f).unwrap()).unwrap(),
                "Message-ID",
            )
            .unwrap()
        })
        .collect();
    assert_eq!(ids_seen, vec![mid(&ids[0]), mid(&ids[3]), mid(&ids[3])]);
    assert_eq!(
        status(http_port, &token).unwrap()["duplicate_mail_risk"]
            .as_u64()
            .unwrap(),
        before + 1
    );
    // The node logs message ids and outcomes, never the address.
    let log = std::fs::read_to_string(hq.join("kizuna.log")).unwrap();
    assert!(log.contains("indeterminate"), "{log}");
    assert!(
        !log.contains(&format!("family-{}", ids[3])),
        "address in the log"
    );
}

// ----- TLS and AUTH against the same server, over STARTTLS and implicit TLS --

/// A self-signed certificate for `localhost` and 127.0.0.1, made by the
/// test: (cert PEM path, key PEM path).
fn test_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("smtp.crt.pem"), dir.join("smtp.key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn tls_settings(port: u16, mode: node::mail::TlsMode, ca: &Path) -> SmtpSettings {
    let mut s = settings(port);
    s.tls = Some(node::mail::SmtpTls {
        mode,
        config: node::mail::tls_client_config(Some(ca)).unwrap(),
        server_name: "localhost".into(),
    });
    s
}

fn tls_args<'a>(mode: &'a str, cert: &'a Path, key: &'a Path) -> Vec<&'a str> {
    vec![
        "--tls",
        mode,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]
}

const MODES: [(&str, node::mail::TlsMode); 2] = [
    ("starttls", node::mail::TlsMode::StartTls),
    ("implicit", node::mail::TlsMode::Implicit),
];

#[test]
fn starttls_and_implicit_tls_deliver_and_plaintext_is_never_a_fallback() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = test_cert(certs.path());
    for (name, mode) in MODES {
        let dir = tempfile::tempdir().unwrap();
        let srv = Smtpd::start("accept", 0, Some(dir.path()), &tls_args(name, &cert, &key));
        let out = rt().block_on(send(&tls_settings(srv.port, mode, &cert), &req()));
        assert_eq!(out, MailOutcome::Sent, "{name}");
        let files = mail_files(dir.path());
        assert_eq!(files.len(), 1, "{name}");
        let mail = String::from_utf8(std::fs::read(&files[0]).unwrap()).unwrap();
        assert_eq!(header(&mail, "Message-ID").unwrap(), req().message_id);
    }
    // A relay without STARTTLS: refused, nothing sent in plaintext.
    let dir = tempfile::tempdir().unwrap();
    let srv = Smtpd::start("accept", 0, Some(dir.path()), &[]);
    match rt().block_on(send(
        &tls_settings(srv.port, node::mail::TlsMode::StartTls, &cert),
        &req(),
    )) {
        MailOutcome::Transient(r) => assert!(r.contains("STARTTLS"), "{r}"),
        o => panic!("{o:?}"),
    }
    assert!(mail_files(dir.path()).is_empty());
    // A certificate from a CA we do not trust: the handshake fails.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _) = test_cert(other.path());
    for (name, mode) in MODES {
        let dir = tempfile::tempdir().unwrap();
        let srv = Smtpd::start("accept", 0, Some(dir.path()), &tls_args(name, &cert, &key));
        match rt().block_on(send(&tls_settings(srv.port, mode, &other_ca), &req())) {
            MailOutcome::Transient(r) => assert!(r.contains("TLS handshake"), "{name}: {r}"),
            o => panic!("{name}: {o:?}"),
        }
        assert!(mail_files(dir.path()).is_empty(), "{name}");
    }
}

#[test]
fn auth_plain_and_login_succeed_and_wrong_credentials_send_nothing() {
    use lettre::transport::smtp::authentication::{Credentials, Mechanism};
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = test_cert(certs.path());
    for (name, mode) in MODES {
        let dir = tempfile::tempdir().unwrap();
        let mut args = tls_args(name, &cert, &key);
        args.extend(["--auth", "kizuna:s3cret パス"]);
        let srv = Smtpd::start("accept", 0, Some(dir.path()), &args);
        for mechanism in [Mechanism::Plain, Mechanism::Login] {
            let mut s = tls_settings(srv.port, mode, &cert);
            s.auth = Some(Credentials::new("kizuna".into(), "s3cret パス".into()));
            s.auth_mechanisms = vec![mechanism];
            assert_eq!(
                rt().block_on(send(&s, &req())),
                MailOutcome::Sent,
                "{name} {mechanism}"
            );
        }
        assert_eq!(mail_files(dir.path()).len(), 2, "{name}");
        let mut s = tls_settings(srv.port, mode, &cert);
        s.auth = Some(Credentials::new("kizuna".into(), "wrong".into()));
        match rt().block_on(send(&s, &req())) {
            MailOutcome::Transient(r) => assert!(r.contains("AUTH refused"), "{name}: {r}"),
            o => panic!("{name}: {o:?}"),
        }
        // Without AUTH the relay refuses the sender (530): permanent,
        // like any 5xx before the message.
        let s = tls_settings(srv.port, mode, &cert);
        match rt().block_on(send(&s, &req())) {
            MailOutcome::Permanent(r) => assert!(r.contains("530"), "{name}: {r}"),
            o => panic!("{name}: {o:?}"),
        }
        assert_eq!(mail_files(dir.path()).len(), 2, "{name}: nothing more");
    }
}

#[test]
fn fault_modes_keep_their_outcomes_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = test_cert(certs.path());
    for (name, mode) in MODES {
        let args = tls_args(name, &cert, &key);
        let srv = Smtpd::start("tempfail", 0, None, &args);
        match rt().block_on(send(&tls_settings(srv.port, mode, &cert), &req())) {
            MailOutcome::Transient(r) => assert!(r.contains("451"), "{name}: {r}"),
            o => panic!("{name}: {o:?}"),
        }
        srv.stop();
        let srv = Smtpd::start("permfail", 0, None, &args);
        match rt().block_on(send(&tls_settings(srv.port, mode, &cert), &req())) {
            MailOutcome::Permanent(r) => assert!(r.contains("550"), "{name}: {r}"),
            o => panic!("{name}: {o:?}"),
        }
        srv.stop();
        let dir = tempfile::tempdir().unwrap();
        let srv = Smtpd::start("drop-after-data", 0, Some(dir.path()), &args);
        match rt().block_on(send(&tls_settings(srv.port, mode, &cert), &req())) {
            MailOutcome::Indeterminate(_) => {}
            o => panic!("{name}: {o:?}"),
        }
        assert_eq!(mail_files(dir.path()).len(), 1, "{name}");
        srv.stop();
        let mut slow = args.clone();
        slow.extend(["--delay", "10", "--slow-phase", "data"]);
        let dir = tempfile::tempdir().unwrap();
        let srv = Smtpd::start("slow", 0, Some(dir.path()), &slow);
        match rt().block_on(send(&tls_settings(srv.port, mode, &cert), &req())) {
            MailOutcome::Indeterminate(r) => assert!(r.contains("final"), "{name}: {r}"),
            o => panic!("{name}: {o:?}"),
        }
        srv.stop();
    }
}

/// 200 arrivals through an hq `kizuna run` node sending over STARTTLS
/// with AUTH: exactly 200 mails at the server, each Message-ID once, and
/// 200 `sent` rows in `GET /api/v1/outbox`.
#[test]
fn two_hundred_arrivals_over_starttls_with_auth_are_counted_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (cert, key) = test_cert(root);
    let ca = root.join("ca");
    certs::ca::init_ca(&ca, "Mail Test CA").unwrap();
    let hq = root.join("hq");
    certs::ca::issue(
        &ca,
        crdt::Role::Hq,
        &crdt::NodeId::new("hq-1").unwrap(),
        &hq.join("certs"),
        30,
    )
    .unwrap();
    let data = hq.join("data");
    let mut reg = "household_id,address,person_id,name,kana,birth_date,card_user_id\n".to_string();
    let mut contacts = "person_id,contact_id,contact_name,relation,email,language,consent,consent_date,do_not_disclose,share_shelter\n".to_string();
    for i in 0..200 {
        reg.push_str(&format!(
            "h{i},三条市{i},p{i},山田 {i},ヤマダ {i},1950-04-01,\n"
        ));
        contacts.push_str(&format!(
            "p{i},c{i},家族 {i},長女,family{i}@example.jp,ja,1,2026-04-01,0,1\n"
        ));
    }
    std::fs::write(root.join("reg.csv"), reg).unwrap();
    std::fs::write(root.join("contacts.csv"), contacts).unwrap();
    for args in [
        vec!["registry", "import", "--node-id", "hq-1", "--data-dir"],
        vec!["import", "contacts", "--data-dir"],
    ] {
        let file = if args[0] == "registry" {
            "reg.csv"
        } else {
            "contacts.csv"
        };
        let st = kizuna()
            .args(&args)
            .arg(&data)
            .arg(root.join(file))
            .output()
            .unwrap();
        assert!(st.status.success(), "{st:?}");
    }
    node::demo::put_shelters(&data, "hq-1", &[("shelter-01", "三条小学校")]).unwrap();
    let token = node::auth::Operators::add(&data, "test").unwrap();
    let mail_dir = root.join("mail");
    let mut args = tls_args("starttls", &cert, &key);
    args.extend(["--auth", "kizuna:relay-pass"]);
    let _smtpd = Smtpd::start("accept", 0, Some(&mail_dir), &args);
    std::fs::write(root.join("smtp-password"), "relay-pass\n").unwrap();
    let (smtp_port, ca_file) = (_smtpd.port, cert.display().to_string());
    let password_file = root.join("smtp-password").display().to_string();
    let (_node, http_port) = start_node(&hq, &token, |http_port, quic_port| {
        format!(
            "data_dir = \"data\"\n[certs]\ndir = \"certs\"\n[net]\nlisten = \"127.0.0.1:{quic_port}\"\nmdns = false\n[http]\nbind = \"127.0.0.1:{http_port}\"\n[smtp]\nhost = \"127.0.0.1\"\nport = {smtp_port}\nfrom = \"kizuna@example.jp\"\ntls = \"starttls\"\nserver_name = \"localhost\"\nca_file = \"{ca_file}\"\nusername = \"kizuna\"\npassword_file = \"{password_file}\"\ntimeout_secs = 10\nmax_concurrent = 8\n"
        )
    });
    let ids: Vec<String> = (0..200).map(|i| format!("\"p{i}\"")).collect();
    let (code, body) = http(
        http_port,
        &token,
        "POST",
        "/api/v1/checkins",
        &format!(
            "{{\"person_ids\":[{}],\"shelter_id\":\"shelter-01\"}}",
            ids.join(",")
        ),
    )
    .unwrap();
    assert_eq!(code, 201, "{body}");
    let outbox = poll("200 sent in the outbox", 120, || {
        let (code, body) = http(http_port, &token, "GET", "/api/v1/outbox", "")?;
        assert_eq!(code, 200);
        let rows: serde_json::Value = serde_json::from_str(&body).ok()?;
        let sent = rows
            .as_array()?
            .iter()
            .filter(|r| r["state"] == "sent")
            .count();
        (sent == 200).then_some(rows)
    });
    assert_eq!(outbox.as_array().unwrap().len(), 200);
    assert!(outbox
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["attempts"] == 1 && r["last_error"].is_null()));
    let files = mail_files(&mail_dir);
    assert_eq!(files.len(), 200, "exactly 200 mails at the server");
    let mut mids: Vec<String> = files
        .iter()
        .map(|f| {
            header(
                &String::from_utf8(std::fs::read(f).unwrap()).unwrap(),
                "Message-ID",
            )
            .unwrap()
        })
        .collect();
    mids.sort();
    mids.dedup();
    assert_eq!(mids.len(), 200, "each Message-ID once");
    let s = status(http_port, &token).unwrap();
    assert_eq!(
        (s["mail_queue"].clone(), s["duplicate_mail_risk"].clone()),
        (0.into(), 0.into())
    );
}
