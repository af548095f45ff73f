//! What only the browser test uses on top of `harness.rs` (which the
//! screens benchmark compiles too): the page (reading, filling, clicking,
//! submitting, screenshots, script-injection checks), the keyboard, print
//! media and PDFs, stopping a node and adding operators, a mail relay, and
//! HTTP with binary bodies. The methods extend the harness's `NodeProc`
//! and `Browser` here, in a second `impl`, so that the benchmark does not
//! compile them.

use crate::harness::*;
use anyhow::{anyhow, bail, Context, Result};
use fantoccini::elements::Element;
use fantoccini::error::CmdError;
use fantoccini::Locator;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

// ----- nodes -----------------------------------------------------------------

impl NodeProc {
    /// SIGTERM and wait (the node shuts down cleanly).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Adds an operator (bearer token returned), optionally with a password.
    pub fn add_operator(&self, name: &str, password: Option<&str>) -> Result<String> {
        let d = self.data();
        let d = d.to_str().unwrap();
        let token = kizuna(&["operator", "add", "--data-dir", d, "--name", name], "")?;
        if let Some(pw) = password {
            kizuna(
                &["operator", "password", "--data-dir", d, "--name", name],
                &format!("{pw}\n"),
            )?;
        }
        Ok(token)
    }
}

// ----- the page --------------------------------------------------------------

/// The WebDriver code point of a special key.
pub fn key(k: fantoccini::key::Key) -> char {
    k.chars().next().expect("a key code point")
}

impl Browser {
    /// Finds `css` and runs `act` on it. The screens re-render parts of
    /// the page as data arrives, so an element found a moment ago may be
    /// replaced before the action reaches it (a stale element reference);
    /// then the element is found again, as a user's next tap would. Any
    /// other error, or staleness past the deadline, is returned.
    async fn on_element<T, F, Fut>(&self, css: &str, act: F) -> Result<T>
    where
        F: Fn(Element) -> Fut,
        Fut: std::future::Future<Output = Result<T, CmdError>>,
    {
        let start = Instant::now();
        loop {
            let r = match self.c.find(Locator::Css(css)).await {
                Ok(e) => act(e).await,
                Err(e) => Err(e),
            };
            match r {
                Err(e) if e.is_stale_element_reference() && start.elapsed() < DEADLINE => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                r => return r.with_context(|| format!("element {css}")),
            }
        }
    }

    pub async fn text(&self, css: &str) -> Result<String> {
        self.on_element(css, |e| async move { e.text().await })
            .await
    }

    pub async fn fill(&self, css: &str, value: &str) -> Result<()> {
        self.on_element(css, |e| async move { e.clear().await })
            .await?;
        // Values go in through the DOM so every character (bidi marks,
        // variation selectors) arrives exactly; then the page's own events.
        self.c
            .execute(
                "const e = document.querySelector(arguments[0]); e.value = arguments[1]; \
                 e.dispatchEvent(new Event('input', {bubbles: true}));",
                vec![json!(css), json!(value)],
            )
            .await?;
        Ok(())
    }

    /// Clicks a button that posts a form and waits until the next page is
    /// there and `script` is truthy on it.
    pub async fn submit(&self, css: &str, what: &str, script: &str) -> Result<serde_json::Value> {
        self.js("window.__oldPage = true;").await?;
        self.click(css).await?;
        let guarded = format!("if (window.__oldPage) return null; {script}");
        self.wait_js(what, &guarded).await
    }

    pub async fn click(&self, css: &str) -> Result<()> {
        self.on_element(css, |e| async move { e.click().await })
            .await
    }

    /// No dialog is open and no payload ran or became an element.
    pub async fn assert_no_injection(&self, what: &str) -> Result<()> {
        if let Ok(t) = self.c.get_alert_text().await {
            bail!("{what}: a dialog opened: {t}");
        }
        let v = self
            .js("return {xss: window.__xss || 0, els: document.querySelectorAll('[data-xss]').length};")
            .await?;
        if v["xss"] != json!(0) || v["els"] != json!(0) {
            bail!("{what}: a payload ran or became markup: {v}");
        }
        Ok(())
    }

    /// A screenshot of the top of the page.
    pub async fn screenshot(&self, name: &str) -> Result<()> {
        self.js("window.scrollTo(0, 0);").await?;
        self.shot(name).await
    }

    /// A screenshot with the element `css` scrolled to the top.
    pub async fn screenshot_at(&self, name: &str, css: &str) -> Result<()> {
        self.c
            .execute(
                "const e = document.querySelector(arguments[0]); if (e) e.scrollIntoView({block: 'start'});",
                vec![json!(css)],
            )
            .await?;
        self.shot(name).await
    }

    async fn shot(&self, name: &str) -> Result<()> {
        let png = self.c.screenshot().await?;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.png")), &png)?;
        if std::env::var_os("KIZUNA_UPDATE_DOCS").is_some() {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
            std::fs::create_dir_all(&docs)?;
            std::fs::write(docs.join(format!("{name}.png")), &png)?;
        }
        Ok(())
    }

    /// A Chrome DevTools Protocol command through chromedriver's
    /// `goog/cdp/execute` endpoint (for what WebDriver has no command for,
    /// such as emulating print media); its result.
    pub async fn cdp(&self, cmd: &str, params: Value) -> Result<Value> {
        let sid = self.c.session_id().await?.context("no WebDriver session")?;
        let body = json!({"cmd": cmd, "params": params}).to_string();
        let (port, path) = (self.driver.port, format!("/session/{sid}/goog/cdp/execute"));
        let (status, text) = tokio::task::block_in_place(|| {
            http_bytes(
                port,
                "POST",
                &path,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
        })?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status != 200 {
            bail!("CDP {cmd}: {status} {text}");
        }
        Ok(v["value"].clone())
    }

    /// Presses and releases each key of `keys` in turn on the focused
    /// element, as a keyboard would (WebDriver key actions; special keys
    /// as `fantoccini::key::Key` code points).
    pub async fn keys(&self, keys: &[char]) -> Result<()> {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        let mut a = KeyActions::new("keyboard".into());
        for &k in keys {
            a = a
                .then(KeyAction::Down { value: k })
                .then(KeyAction::Up { value: k });
        }
        self.c.perform_actions(a).await?;
        Ok(())
    }

    /// Shift+Tab.
    pub async fn shift_tab(&self) -> Result<()> {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        let (shift, tab) = (
            key(fantoccini::key::Key::Shift),
            key(fantoccini::key::Key::Tab),
        );
        let a = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: shift })
            .then(KeyAction::Down { value: tab })
            .then(KeyAction::Up { value: tab })
            .then(KeyAction::Up { value: shift });
        self.c.perform_actions(a).await?;
        Ok(())
    }

    /// The focused element: its id, whether it matches `css`, and whether
    /// its focus is visible without relying on colour (an outline at
    /// least 2px wide, or a box shadow).
    pub async fn focused(&self, css: &str) -> Result<Value> {
        Ok(self
            .c
            .execute(
                "const e = document.activeElement; \
                 if (!e || e === document.body) return {id: null, matches: false, visible: false, what: 'body'}; \
                 const s = getComputedStyle(e); \
                 const outline = s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2; \
                 const shadow = s.boxShadow && s.boxShadow !== 'none'; \
                 return {id: e.id || null, matches: e.matches(arguments[0]), visible: outline || !!shadow, \
                         what: e.outerHTML.slice(0, 100)};",
                vec![json!(css)],
            )
            .await?)
    }

    /// Presses Tab (Shift+Tab when `back`) until the focus is on `css`,
    /// at most `max` times; every element the focus passes shows it.
    pub async fn tab_to(&self, css: &str, back: bool, max: usize) -> Result<()> {
        for _ in 0..max {
            if back {
                self.shift_tab().await?;
            } else {
                self.keys(&[key(fantoccini::key::Key::Tab)]).await?;
            }
            let f = self.focused(css).await?;
            if f["what"] != json!("body") && f["visible"] != json!(true) {
                bail!("focus not visible on {}", f["what"]);
            }
            if f["matches"] == json!(true) {
                return Ok(());
            }
        }
        bail!("{css} not reached with {max} presses of (Shift+)Tab")
    }

    /// The current page printed (WebDriver Print, A4) into
    /// `target/screenshots/NAME.pdf` beside the screenshots; its bytes.
    pub async fn print_pdf(&self, name: &str) -> Result<Vec<u8>> {
        let cfg = fantoccini::wd::PrintConfiguration::builder()
            .build()
            .map_err(|e| anyhow!("{e}"))?;
        let pdf = self.c.print(cfg).await?;
        anyhow::ensure!(pdf.starts_with(b"%PDF-"), "{name}: not a PDF");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.pdf")), &pdf)?;
        Ok(pdf)
    }

    /// Runs `script` with the page rendered as for print (CSS print
    /// media), then renders it for the screen again; the script's value.
    pub async fn as_printed(&self, script: &str) -> Result<Value> {
        self.cdp("Emulation.setEmulatedMedia", json!({"media": "print"}))
            .await?;
        let v = self.js(script).await;
        self.cdp("Emulation.setEmulatedMedia", json!({"media": ""}))
            .await?;
        v
    }
}

// ----- a mail relay ----------------------------------------------------------

/// A plaintext SMTP relay on loopback for headquarters' family mail. What
/// it does with a message depends on its recipient's local part:
/// `…+fail` is refused for good (550 at RCPT), `…+later` is refused for now
/// (451 at RCPT), `…+cut` loses the connection after the message was sent
/// but before it was acknowledged, anything else is accepted.
pub struct FakeSmtp {
    pub port: u16,
}

impl FakeSmtp {
    pub fn start() -> Result<FakeSmtp> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = smtp_session(s);
                });
            }
        });
        Ok(FakeSmtp { port })
    }

    /// The `[smtp]` section of headquarters' config for this relay.
    pub fn config(&self) -> String {
        format!(
            "[smtp]\nhost = \"127.0.0.1\"\nport = {}\nfrom = \"kizuna@example.org\"\ntls = \"none\"\ntimeout_secs = 10\ndata_timeout_secs = 10\n",
            self.port
        )
    }
}

fn smtp_session(s: std::net::TcpStream) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 relay.test ESMTP\r\n")?;
    let mut rcpt = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_ascii_uppercase();
        if cmd.starts_with("EHLO") || cmd.starts_with("HELO") {
            w.write_all(b"250-relay.test\r\n250 8BITMIME\r\n")?;
        } else if cmd.starts_with("MAIL FROM") || cmd.starts_with("RSET") || cmd.starts_with("NOOP")
        {
            w.write_all(b"250 2.0.0 ok\r\n")?;
        } else if cmd.starts_with("RCPT TO") {
            rcpt = cmd.clone();
            if cmd.contains("+FAIL@") {
                w.write_all(b"550 5.1.1 mailbox unavailable\r\n")?;
            } else if cmd.contains("+LATER@") {
                w.write_all(b"451 4.3.0 try again later\r\n")?;
            } else {
                w.write_all(b"250 2.1.5 ok\r\n")?;
            }
        } else if cmd == "DATA" {
            w.write_all(b"354 go ahead\r\n")?;
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
            }
            if rcpt.contains("+CUT@") {
                // The message went through; its acknowledgement never comes.
                return Ok(());
            }
            w.write_all(b"250 2.0.0 queued\r\n")?;
        } else if cmd.starts_with("QUIT") {
            w.write_all(b"221 2.0.0 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"502 5.5.2 not implemented\r\n")?;
        }
    }
}

/// An HTTP/1.1 request with a binary body on loopback, the connection
/// closed after the answer (chromedriver does not answer HTTP/1.0):
/// (status, body).
pub fn http_bytes(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut all = req.into_bytes();
    all.extend_from_slice(body);
    s.set_read_timeout(Some(DEADLINE))?;
    s.write_all(&all)?;
    // Read the head, then exactly Content-Length bytes: a server may keep
    // the connection open whatever the request said.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad response: {head}"))?;
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    let mut body = buf[head_end + 4..].to_vec();
    match len {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    bail!("connection closed inside the body");
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => {
            s.read_to_end(&mut body)?;
        }
    }
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// Pages in a PDF as Chromium writes it (one `/Type /Page` object each).
pub fn pdf_pages(pdf: &[u8]) -> usize {
    let pat = b"/Type /Page";
    pdf.windows(pat.len() + 1)
        .filter(|w| &w[..pat.len()] == pat && w[pat.len()] != b's')
        .count()
}
