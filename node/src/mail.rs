//! Family safety mail over SMTP (faults G-1..G-4, inputs I-17, I-26).
//!
//! The engine decides which mails are due and emits
//! [`crdt::api::Output::SendMail`]; [`install`] sets a mail sink on the
//! driver that spawns one tokio task per request (at most
//! [`SmtpSettings::max_concurrent`] in flight) and reports the outcome
//! back with [`crdt::api::Input::MailOutcome`]. The engine thread never
//! waits for SMTP.
//!
//! The SMTP dialogue is hand-rolled (greeting, EHLO/HELO, STARTTLS, AUTH,
//! MAIL FROM, RCPT TO, DATA, dot-stuffed body, ".", QUIT) so the boundary
//! that matters for duplicates is exact: lettre's transports report one
//! error for "the body could not be written" and "the reply to the final
//! '.' never came", which are transient and indeterminate here. lettre
//! builds the RFC 5322 message (`Message::formatted()`) and computes the
//! AUTH PLAIN and LOGIN responses ([`Mechanism::response`]); the TLS layer
//! is rustls through tokio-rustls (the stack lettre's own `tokio1-rustls`
//! feature uses), with the CA roots from `[smtp] ca_file` or the system.
//!
//! TLS modes ([`TlsMode`]): `implicit` (TLS from the first byte, port
//! 465), `starttls` (EHLO, STARTTLS, handshake, EHLO again; a server that
//! does not offer STARTTLS is a transient failure, never a silent
//! downgrade) and `none` (plaintext, only when configured explicitly).
//! A handshake or certificate failure and a refused AUTH are transient:
//! they say nothing about the message, an operator fixes the relay
//! settings, and the mail is retried (its `last_error` in
//! `GET /api/v1/outbox` says why).
//!
//! Outcome mapping ([`send`]):
//!
//! | What happened | Outcome |
//! |---|---|
//! | 2xx to the final "." | `Sent` |
//! | connect refused, DNS failure, connect timeout | `Transient` |
//! | I/O error, EOF or timeout before the final "." was written | `Transient` |
//! | 4xx at any step (incl. after the final ".") | `Transient` |
//! | 5xx at any step (incl. per-recipient 550) | `Permanent` (reply text) |
//! | write of the final "." failed, or EOF / I/O error / timeout / garbage while waiting for its reply | `Indeterminate` (G-3) |
//! | header value with control characters, bad address, message build failure | `Permanent` |
//!
//! Logging: message id and outcome kind only, never addresses, names or
//! server reply text (which may echo an address).

use crate::driver::DriverHandle;
use crdt::api::{Input, MailOutcome, MailRequest};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How the connection to the relay is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Plaintext; only when configured explicitly (a relay on loopback).
    None,
    /// EHLO, then STARTTLS (port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// TLS client settings: the trusted roots and the name the relay's
/// certificate must carry.
#[derive(Clone)]
pub struct SmtpTls {
    pub mode: TlsMode,
    pub config: Arc<rustls::ClientConfig>,
    /// Defaults to the host.
    pub server_name: String,
}

impl std::fmt::Debug for SmtpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SmtpTls({:?}, {})", self.mode, self.server_name)
    }
}

impl PartialEq for SmtpTls {
    fn eq(&self, o: &Self) -> bool {
        self.mode == o.mode
            && self.server_name == o.server_name
            && Arc::ptr_eq(&self.config, &o.config)
    }
}
impl Eq for SmtpTls {}

/// A rustls client configuration trusting the PEM certificates in
/// `ca_file`, or the system's roots when `None`.
pub fn tls_client_config(
    ca_file: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem =
                std::fs::read(path).map_err(|e| format!("smtp.ca_file {}: {e}", path.display()))?;
            let mut n = 0;
            for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let cert: rustls_pki_types::CertificateDer<'static> =
                    cert.map_err(|e| format!("smtp.ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("smtp.ca_file {}: {e}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!(
                    "smtp.ca_file {}: no PEM certificate in it",
                    path.display()
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "no system CA certificates found (install ca-certificates or set smtp.ca_file)"
                        .into(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// How to reach the relay and how long to wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    /// Envelope sender and `From` header.
    pub from: String,
    /// Name sent with EHLO/HELO.
    pub helo: String,
    /// Connecting (including name resolution).
    pub connect_timeout: Duration,
    /// Each reply before the message is sent, and each write.
    pub reply_timeout: Duration,
    /// The reply to the final "."; expiry makes the outcome indeterminate.
    pub data_timeout: Duration,
    /// Sends in flight at once.
    pub max_concurrent: usize,
    /// `None`: plaintext.
    pub tls: Option<SmtpTls>,
    /// AUTH PLAIN or LOGIN (whichever the relay offers, PLAIN first).
    pub auth: Option<Credentials>,
    /// Mechanisms to use, in order of preference (default PLAIN, LOGIN).
    pub auth_mechanisms: Vec<Mechanism>,
}

impl SmtpSettings {
    /// Defaults: 30 s per phase, 120 s for the reply to the final ".", 4
    /// sends at a time, HELO name `kizuna.invalid`.
    pub fn new(host: impl Into<String>, port: u16, from: impl Into<String>) -> SmtpSettings {
        SmtpSettings {
            host: host.into(),
            port,
            from: from.into(),
            helo: "kizuna.invalid".into(),
            connect_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(30),
            data_timeout: Duration::from_secs(120),
            max_concurrent: 4,
            tls: None,
            auth: None,
            auth_mechanisms: vec![Mechanism::Plain, Mechanism::Login],
        }
    }

    /// From the validated `[smtp]` table; reads the CA and password
    /// files, so a missing file stops the start like any config error.
    pub fn from_config(c: &crate::config::SmtpConfig) -> Result<SmtpSettings, String> {
        use crate::config::SmtpTlsMode;
        let mut s = SmtpSettings::new(&c.host, c.port, &c.from);
        s.connect_timeout = Duration::from_secs(c.timeout_secs);
        s.reply_timeout = Duration::from_secs(c.timeout_secs);
        s.data_timeout = Duration::from_secs(c.data_timeout_secs);
        s.max_concurrent = c.max_concurrent.max(1);
        if let Ok(h) = hostname_for_helo() {
            s.helo = h;
        }
        let mode = match c.tls {
            SmtpTlsMode::None => TlsMode::None,
            SmtpTlsMode::StartTls => TlsMode::StartTls,
            SmtpTlsMode::Implicit => TlsMode::Implicit,
        };
        if mode != TlsMode::None {
            s.tls = Some(SmtpTls {
                mode,
                config: tls_client_config(c.ca_file.as_deref())?,
                server_name: c.server_name.clone().unwrap_or_else(|| c.host.clone()),
            });
        }
        if let (Some(user), Some(file)) = (&c.username, &c.password_file) {
            let password = std::fs::read_to_string(file)
                .map_err(|e| format!("smtp.password_file {}: {e}", file.display()))?;
            let password = password.trim_end_matches(['\r', '\n']).to_string();
            if password.is_empty() {
                return Err(format!("smtp.password_file {}: empty", file.display()));
            }
            s.auth = Some(Credentials::new(user.clone(), password));
        }
        Ok(s)
    }
}

fn hostname_for_helo() -> Result<String, ()> {
    let h = std::fs::read_to_string("/etc/hostname").map_err(|_| ())?;
    let h = h.trim();
    if !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        Ok(h.to_string())
    } else {
        Err(())
    }
}

/// Sets the driver's mail sink: each [`MailRequest`] is sent on a task of
/// `rt`, and its outcome goes back through [`DriverHandle::input`].
pub fn install(driver: &DriverHandle, settings: SmtpSettings, rt: tokio::runtime::Handle) {
    let settings = Arc::new(settings);
    let permits = Arc::new(tokio::sync::Semaphore::new(settings.max_concurrent.max(1)));
    let d = driver.clone();
    driver.set_mail_sink(Box::new(move |req: MailRequest| {
        let settings = settings.clone();
        let permits = permits.clone();
        let d = d.clone();
        rt.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let outcome = send(&settings, &req).await;
            let _ = d.input(Input::MailOutcome {
                message_id: req.message_id,
                outcome,
            });
        });
    }));
}

fn kind(o: &MailOutcome) -> &'static str {
    match o {
        MailOutcome::Sent => "sent",
        MailOutcome::Transient(_) => "transient",
        MailOutcome::Permanent(_) => "permanent",
        MailOutcome::Indeterminate(_) => "indeterminate",
    }
}

/// Sends one mail and classifies the result (see the module docs). Never
/// panics and never takes longer than the configured timeouts allow.
pub async fn send(s: &SmtpSettings, req: &MailRequest) -> MailOutcome {
    let outcome = match prepare(&s.from, req) {
        Err(e) => MailOutcome::Permanent(e),
        Ok(p) => transact(s, &p).await,
    };
    tracing::info!(message_id = %req.message_id, outcome = kind(&outcome), "family mail");
    outcome
}

/// A message ready for the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// Envelope sender (ASCII).
    pub mail_from: String,
    /// Envelope recipient, domain in punycode (ASCII).
    pub rcpt_to: String,
    /// The RFC 5322 message, CRLF line ends, not yet dot-stuffed.
    pub data: Vec<u8>,
}

/// Characters never allowed in a header value (I-17): C0/C1 controls,
/// DEL, and the Unicode line and paragraph separators.
fn has_control(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
}

/// `local@domain` with the domain converted to punycode (I-26). The local
/// part must be ASCII (no SMTPUTF8).
pub fn ascii_address(field: &str, addr: &str) -> Result<String, String> {
    if has_control(addr) {
        return Err(format!("{field}: control characters in the address"));
    }
    let (local, domain) = addr
        .rsplit_once('@')
        .ok_or_else(|| format!("{field}: no @ in the address"))?;
    if local.is_empty() || !local.is_ascii() || local.contains(['<', '>', ' ']) {
        return Err(format!("{field}: local part unusable without SMTPUTF8"));
    }
    let domain = idna::domain_to_ascii(domain)
        .map_err(|_| format!("{field}: the domain is not a valid (IDN) domain"))?;
    if domain.is_empty() || !domain.is_ascii() {
        return Err(format!("{field}: empty domain"));
    }
    let a = format!("{local}@{domain}");
    if a.len() > 254 {
        return Err(format!("{field}: longer than 254 characters"));
    }
    Ok(a)
}

/// Validates the request and builds the message: `Message-ID` exactly as
/// given, `From`, `To` (punycode domain), UTF-8 subject (RFC 2047
/// encoded by lettre) and body, `Content-Type: text/plain; charset=utf-8`.
/// Any error is permanent: retrying cannot fix it.
pub fn prepare(from: &str, req: &MailRequest) -> Result<Prepared, String> {
    use lettre::message::{header::ContentType, Mailbox, Message};
    for (field, v) in [
        ("message_id", &req.message_id),
        ("to", &req.to),
        ("subject", &req.subject),
        ("from", &from.to_string()),
    ] {
        if has_control(v) {
            return Err(format!("{field}: control characters refused (I-17)"));
        }
    }
    if req
        .body
        .chars()
        .any(|c| (c.is_control() && c != '\n' && c != '\t') || c == '\u{2028}' || c == '\u{2029}')
    {
        return Err("body: control characters refused (I-17)".into());
    }
    let mid = &req.message_id;
    if !(mid.starts_with('<') && mid.ends_with('>') && mid.len() > 2 && mid.len() <= 250)
        || !mid.is_ascii()
        || mid.contains(' ')
        || !mid.contains('@')
    {
        return Err("message_id: not of the form <id@domain>".into());
    }
    let mail_from = ascii_address("from", from)?;
    let rcpt_to = ascii_address("to", &req.to)?;
    let from_box: Mailbox = mail_from
        .parse()
        .map_err(|e| format!("from: unusable address: {e}"))?;
    let to_box: Mailbox = rcpt_to
        .parse()
        .map_err(|e| format!("to: unusable address: {e}"))?;
    let msg = Message::builder()
        .message_id(Some(mid.clone()))
        .from(from_box)
        .to(to_box)
        .subject(req.subject.clone())
        .header(ContentType::TEXT_PLAIN)
        .body(req.body.replace('\n', "\r\n"))
        .map_err(|e| format!("cannot build the message: {e}"))?;
    Ok(Prepared {
        mail_from,
        rcpt_to,
        data: msg.formatted(),
    })
}

/// Dot-stuffs `data` (RFC 5321 4.5.2), normalises line ends to CRLF and
/// makes it end with CRLF. The terminating ".\r\n" is not included.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut at_line_start = true;
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        match b {
            b'\r' if data.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
                at_line_start = true;
            }
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
            }
            _ => {
                out.push(b);
                at_line_start = false;
            }
        }
        i += 1;
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One SMTP reply: the code of its last line and all its text.
struct Reply {
    code: u16,
    text: String,
}

const MAX_REPLY_LINES: usize = 100;
const MAX_LINE: usize = 4096;

/// A byte stream the dialogue runs on: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct Conn {
    r: BufReader<Box<dyn Stream>>,
    timeout: Duration,
}

impl Conn {
    /// Reads one (possibly multi-line) reply within `t`. `Err` = EOF,
    /// I/O error, timeout or garbage.
    async fn reply(&mut self, t: Duration) -> Result<Reply, String> {
        let read = async {
            let mut text = String::new();
            for _ in 0..MAX_REPLY_LINES {
                let mut line = Vec::new();
                let n = (&mut self.r)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut line)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err("connection closed by the server".to_string());
                }
                let l = String::from_utf8_lossy(&line);
                let l = l.trim_end_matches(['\r', '\n']);
                let code: u16 = l
                    .get(..3)
                    .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| "malformed reply".to_string())?;
                if !text.is_empty() {
                    text.push_str(" / ");
                }
                let printable: String = l.chars().filter(|c| !c.is_control()).collect();
                text.push_str(&printable);
                match l.as_bytes().get(3) {
                    Some(b'-') => continue,
                    None | Some(b' ') => return Ok(Reply { code, text }),
                    _ => return Err("malformed reply".to_string()),
                }
            }
            Err("reply too long".to_string())
        };
        tokio::time::timeout(t, read)
            .await
            .map_err(|_| format!("no reply within {} s", t.as_secs_f32()))?
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let w = async {
            let s = self.r.get_mut();
            s.write_all(bytes).await?;
            s.flush().await
        };
        match tokio::time::timeout(self.timeout, w).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err(format!(
                "write not done within {} s",
                self.timeout.as_secs_f32()
            )),
        }
    }

    async fn command(&mut self, line: &str) -> Result<Reply, String> {
        self.write(format!("{line}\r\n").as_bytes()).await?;
        let t = self.timeout;
        self.reply(t).await
    }
}

/// Classifies a reply before the message was accepted: `Ok` if the code
/// is the expected class, otherwise the final outcome.
fn expect(phase: &str, r: Result<Reply, String>, class: u16) -> Result<Reply, MailOutcome> {
    match r {
        Err(e) => Err(MailOutcome::Transient(format!("{phase}: {e}"))),
        Ok(r) if r.code / 100 == class => Ok(r),
        Ok(r) if r.code / 100 == 5 => Err(MailOutcome::Permanent(format!("{phase}: {}", r.text))),
        Ok(r) => Err(MailOutcome::Transient(format!("{phase}: {}", r.text))),
    }
}

/// The EHLO reply's keywords (`STARTTLS`, `AUTH PLAIN LOGIN`, ...).
struct Ehlo(Vec<String>);

impl Ehlo {
    fn has(&self, keyword: &str) -> bool {
        self.0
            .iter()
            .any(|l| l.split_whitespace().next() == Some(keyword))
    }
    fn auth_mechanisms(&self) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("AUTH"))
                    .then(|| w.map(str::to_ascii_uppercase).collect::<Vec<_>>())
            })
            .flatten()
            .collect()
    }
}

/// EHLO (HELO for an old server without ESMTP).
async fn hello(s: &SmtpSettings, c: &mut Conn) -> Result<Ehlo, MailOutcome> {
    match c.command(&format!("EHLO {}", s.helo)).await {
        Ok(r) if r.code / 100 == 5 => {
            expect("HELO", c.command(&format!("HELO {}", s.helo)).await, 2)?;
            Ok(Ehlo(Vec::new()))
        }
        other => {
            let r = expect("EHLO", other, 2)?;
            // Lines are joined with " / "; each starts "250-" or "250 ".
            Ok(Ehlo(
                r.text
                    .split(" / ")
                    .map(|l| l.get(4..).unwrap_or("").trim().to_ascii_uppercase())
                    .collect(),
            ))
        }
    }
}

/// The TLS handshake, within the connect timeout.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &SmtpSettings,
    tls: &SmtpTls,
    stream: S,
) -> Result<tokio_rustls::client::TlsStream<S>, MailOutcome> {
    let name = rustls_pki_types::ServerName::try_from(tls.server_name.clone()).map_err(|_| {
        MailOutcome::Transient(format!(
            "TLS: {:?} is not a valid server name",
            tls.server_name
        ))
    })?;
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    match tokio::time::timeout(s.connect_timeout, connector.connect(name, stream)).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(MailOutcome::Transient(format!("TLS handshake: {e}"))),
        Err(_) => Err(MailOutcome::Transient(format!(
            "TLS handshake: not done within {} s",
            s.connect_timeout.as_secs_f32()
        ))),
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// AUTH PLAIN (initial response) or LOGIN (two challenges), with the
/// responses lettre computes. Refused credentials are transient: see the
/// module docs.
async fn authenticate(
    c: &mut Conn,
    ehlo: &Ehlo,
    creds: &Credentials,
    preferred: &[Mechanism],
) -> Result<(), MailOutcome> {
    let offered = ehlo.auth_mechanisms();
    let mechanism = preferred
        .iter()
        .copied()
        .filter(|m| matches!(m, Mechanism::Plain | Mechanism::Login))
        .find(|m| offered.iter().any(|o| *o == m.to_string()))
        .ok_or_else(|| {
            MailOutcome::Transient("AUTH: the relay offers neither PLAIN nor LOGIN".into())
        })?;
    let refused = |r: Result<Reply, String>| match r {
        Err(e) => MailOutcome::Transient(format!("AUTH: {e}")),
        Ok(r) => MailOutcome::Transient(format!("AUTH refused by the relay: {}", r.text)),
    };
    let client = |e: lettre::transport::smtp::Error| MailOutcome::Transient(format!("AUTH: {e}"));
    let mut reply = match mechanism {
        Mechanism::Plain => {
            let resp = mechanism.response(creds, None).map_err(client)?;
            c.command(&format!("AUTH PLAIN {}", b64(resp.as_bytes())))
                .await
        }
        _ => c.command("AUTH LOGIN").await,
    };
    // LOGIN: answer each 334 challenge (base64 "Username:", "Password:").
    for _ in 0..3 {
        match reply {
            Ok(r) if r.code == 235 => return Ok(()),
            Ok(r) if r.code == 334 && mechanism == Mechanism::Login => {
                use base64::Engine as _;
                let challenge = r.text.get(4..).unwrap_or("").trim();
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(challenge)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| MailOutcome::Transient("AUTH: malformed challenge".into()))?;
                let resp = mechanism.response(creds, Some(&decoded)).map_err(client)?;
                reply = c.command(&b64(resp.as_bytes())).await;
            }
            other => return Err(refused(other)),
        }
    }
    Err(MailOutcome::Transient("AUTH: too many challenges".into()))
}

async fn transact(s: &SmtpSettings, p: &Prepared) -> MailOutcome {
    match dialogue(s, p).await {
        Ok(o) | Err(o) => o,
    }
}

async fn dialogue(s: &SmtpSettings, p: &Prepared) -> Result<MailOutcome, MailOutcome> {
    let target = format!("{}:{}", s.host, s.port);
    let stream = match tokio::time::timeout(
        s.connect_timeout,
        TcpStream::connect((s.host.as_str(), s.port)),
    )
    .await
    {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => return Err(MailOutcome::Transient(format!("connect {target}: {e}"))),
        Err(_) => {
            return Err(MailOutcome::Transient(format!(
                "connect {target}: no connection within {} s",
                s.connect_timeout.as_secs_f32()
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    let stream: Box<dyn Stream> = match &s.tls {
        Some(tls) if tls.mode == TlsMode::Implicit => Box::new(handshake(s, tls, stream).await?),
        _ => Box::new(stream),
    };
    let mut c = Conn {
        r: BufReader::new(stream),
        timeout: s.reply_timeout,
    };
    let t = c.timeout;
    expect("greeting", c.reply(t).await, 2)?;
    let mut ehlo = hello(s, &mut c).await?;
    if let Some(tls) = s.tls.as_ref().filter(|t| t.mode == TlsMode::StartTls) {
        if !ehlo.has("STARTTLS") {
            return Err(MailOutcome::Transient(
                "the relay does not offer STARTTLS (refusing to send in plaintext)".into(),
            ));
        }
        expect("STARTTLS", c.command("STARTTLS").await, 2)?;
        // Anything the server sent after its 220 would be read as if it
        // came over TLS (the STARTTLS injection): refuse it.
        if !c.r.buffer().is_empty() {
            return Err(MailOutcome::Transient(
                "data after the STARTTLS reply (possible injection)".into(),
            ));
        }
        let plain = c.r.into_inner();
        c = Conn {
            r: BufReader::new(Box::new(handshake(s, tls, plain).await?)),
            timeout: s.reply_timeout,
        };
        ehlo = hello(s, &mut c).await?;
    }
    if let Some(creds) = &s.auth {
        authenticate(&mut c, &ehlo, creds, &s.auth_mechanisms).await?;
    }
    expect(
        "MAIL FROM",
        c.command(&format!("MAIL FROM:<{}>", p.mail_from)).await,
        2,
    )?;
    expect(
        "RCPT TO",
        c.command(&format!("RCPT TO:<{}>", p.rcpt_to)).await,
        2,
    )?;
    expect("DATA", c.command("DATA").await, 3)?;
    // The body without its terminator: the server cannot have accepted
    // the message yet, so failures here are transient.
    c.write(&dot_stuff(&p.data))
        .await
        .map_err(|e| MailOutcome::Transient(format!("message body: {e}")))?;
    // From the first byte of the terminator on, the server may have the
    // whole message: anything but a reply is indeterminate (G-3).
    c.write(b".\r\n")
        .await
        .map_err(|e| MailOutcome::Indeterminate(format!("final \".\": {e}")))?;
    let outcome = match c.reply(s.data_timeout).await {
        Ok(r) if r.code / 100 == 2 => MailOutcome::Sent,
        Ok(r) if r.code / 100 == 4 => MailOutcome::Transient(format!("after data: {}", r.text)),
        Ok(r) if r.code / 100 == 5 => MailOutcome::Permanent(format!("after data: {}", r.text)),
        Ok(r) => MailOutcome::Indeterminate(format!("after data: unexpected reply {}", r.text)),
        Err(e) => MailOutcome::Indeterminate(format!("after the final \".\": {e}")),
    };
    // Best effort; the outcome is already decided.
    c.timeout = c.timeout.min(Duration::from_secs(5));
    let _ = c.command("QUIT").await;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> MailRequest {
        MailRequest {
            message_id: "<abc@safety.kizuna.invalid>".into(),
            to: "family@例え.jp".into(),
            subject: "【安否情報】到着".into(),
            body: "山田 太郎 さん\n.leading dot\n".into(),
            person_id: "p1".into(),
            contact_id: "c1".into(),
        }
    }

    #[test]
    fn builds_with_exact_message_id_and_punycode() {
        let p = prepare("kizuna@example.jp", &req()).unwrap();
        assert_eq!(p.rcpt_to, "family@xn--r8jz45g.jp");
        let text = String::from_utf8(p.data.clone()).unwrap();
        assert!(
            text.contains("Message-ID: <abc@safety.kizuna.invalid>\r\n"),
            "{text}"
        );
        assert!(text.contains("charset=utf-8"), "{text}");
        assert!(text.is_ascii());
    }

    #[test]
    fn control_characters_are_permanent() {
        for bad in ["a\u{7}b", "a\r\nBcc: x@y", "a\u{2028}b", "a\0"] {
            let mut r = req();
            r.subject = bad.into();
            assert!(prepare("k@example.jp", &r).is_err(), "{bad:?}");
        }
        let mut r = req();
        r.to = "x@y\r\n.jp".into();
        assert!(prepare("k@example.jp", &r).is_err());
        let mut r = req();
        r.body = "a\u{1b}[31m".into();
        assert!(prepare("k@example.jp", &r).is_err());
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\n..c"), b"..a\r\nb\r\n...c\r\n".to_vec());
        assert_eq!(dot_stuff(b"x\r\n"), b"x\r\n".to_vec());
    }
}
