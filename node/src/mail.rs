//! Family safety mail over SMTP (faults G-1..G-4, inputs I-17, I-26).
//!
//! The engine decides which mails are due and emits
//! [`crdt::api::Output::SendMail`]; [`install`] sets a mail sink on the
//! driver that spawns one tokio task per request (at most
//! [`SmtpSettings::max_concurrent`] in flight) and reports the outcome
//! back with [`crdt::api::Input::MailOutcome`]. The engine thread never
//! waits for SMTP.
//!
//! The SMTP dialogue is hand-rolled on a [`tokio::net::TcpStream`]
//! (greeting, EHLO/HELO, MAIL FROM, RCPT TO, DATA, dot-stuffed body, ".",
//! QUIT) so the boundary that matters for duplicates is exact. lettre is
//! only used to build the RFC 5322 message (`Message::formatted()`).
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
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

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
        }
    }

    pub fn from_config(c: &crate::config::SmtpConfig) -> SmtpSettings {
        let mut s = SmtpSettings::new(&c.host, c.port, &c.from);
        s.connect_timeout = Duration::from_secs(c.timeout_secs);
        s.reply_timeout = Duration::from_secs(c.timeout_secs);
        s.data_timeout = Duration::from_secs(c.data_timeout_secs);
        s.max_concurrent = c.max_concurrent.max(1);
        if let Ok(h) = hostname_for_helo() {
            s.helo = h;
        }
        s
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

struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
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
            self.w.write_all(bytes).await?;
            self.w.flush().await
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
    let (r, w) = stream.into_split();
    let mut c = Conn {
        r: BufReader::new(r),
        w,
        timeout: s.reply_timeout,
    };
    let t = c.timeout;
    expect("greeting", c.reply(t).await, 2)?;
    let ehlo = c.command(&format!("EHLO {}", s.helo)).await;
    match ehlo {
        Ok(r) if r.code / 100 == 5 => {
            // An old server without ESMTP.
            expect("HELO", c.command(&format!("HELO {}", s.helo)).await, 2)?;
        }
        other => {
            expect("EHLO", other, 2)?;
        }
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
