//! `kizuna crl load`: puts a revocation list from `kizuna certs revoke`
//! into force on a node, running or stopped.
//!
//! The command reads the node's config. If the node is running (its data
//! directory lock is held) the list goes to the node's own API
//! (`POST /api/v1/crl` on `[http] bind`, with an operator token), which
//! applies it at once: sessions with newly revoked peers are closed, the
//! list is saved and gossiped to every peer. If the node is stopped the
//! command checks the list against the CA certificate and saves it into the
//! data directory itself (atomically, the replaced list kept as
//! `crl.prev.der`, [`certs::crlstore`]), which is also how a node refusing
//! to start over a damaged stored list is repaired. A damaged, foreign or
//! tampered list changes nothing anywhere, and the message names the list
//! that stays in force.

use crate::config::Config;
use crate::console::Exit;
use crate::store::{DataDirLock, LockError};
use certs::crl::{OfferOutcome, RevocationState};
use certs::crlstore;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Where the operator token for a running node comes from.
pub const TOKEN_ENV: &str = "KIZUNA_TOKEN";

pub fn load(config: &Path, crl: &Path, token_file: Option<&Path>) -> Result<String, Exit> {
    let cfg = Config::load(config).map_err(|e| Exit::bad_input(e.to_string()))?;
    let der = std::fs::read(crl)
        .map_err(|e| Exit::bad_input(format!("cannot read {}: {e}", crl.display())))?;
    if der.len() > certs::crl::MAX_CRL_DER_LEN {
        return Err(Exit::bad_input(format!(
            "{}: {} bytes, larger than any revocation list ({} bytes); nothing changed",
            crl.display(),
            der.len(),
            certs::crl::MAX_CRL_DER_LEN
        )));
    }
    match DataDirLock::acquire(&cfg.data_dir) {
        Ok(lock) => {
            let r = load_stopped(&cfg, &der);
            drop(lock);
            r
        }
        Err(LockError::Held { .. }) => load_running(&cfg, der, token_file),
        Err(e) => Err(Exit::from(anyhow::Error::from(e))),
    }
}

fn load_stopped(cfg: &Config, der: &[u8]) -> Result<String, Exit> {
    let ca =
        certs::creds::read_ca_cert(&cfg.certs.ca).map_err(|e| Exit::bad_input(e.to_string()))?;
    let state = RevocationState::new(ca);
    let path = cfg.data_dir.join(crlstore::CRL_FILE);
    // A damaged stored list is what this command repairs: it only decides
    // which list the new one must be newer than.
    let _ = crlstore::load(&path, &state);
    match crlstore::apply_and_save(&path, &state, der) {
        Ok(OfferOutcome::Applied {
            number,
            newly_revoked,
        }) => Ok(format!(
            "失効リスト番号 {number} を保存しました / revocation list {number} saved in {} ({} newly revoked); it is in force when the node starts",
            path.display(),
            newly_revoked.len()
        )),
        Ok(OfferOutcome::Stale { held, offered }) => Ok(format!(
            "失効リスト番号 {offered} は古いため変更なし / list {offered} is not newer than the list held ({held}); nothing changed"
        )),
        Err(e) => Err(Exit::bad_input(e.to_string())),
    }
}

fn load_running(cfg: &Config, der: Vec<u8>, token_file: Option<&Path>) -> Result<String, Exit> {
    let token = match token_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| Exit::bad_input(format!("cannot read {}: {e}", p.display())))?,
        None => std::env::var(TOKEN_ENV).map_err(|_| {
            Exit::bad_input(format!(
                "the node is running: give an operator token with --token-file FILE or ${TOKEN_ENV} / ノードが稼働中です。オペレーターのトークンを指定してください"
            ))
        })?,
    };
    let token = token.trim();
    let mut addr = cfg.http.bind;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let (status, body) = post(addr, token, &der).map_err(|e| {
        Exit::from(anyhow::anyhow!(
            "the node holds {} but its API at {addr} did not answer: {e}",
            cfg.data_dir.display()
        ))
    })?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    match status {
        200 if v["applied"] == true => Ok(format!(
            "失効リスト番号 {} を適用しました / revocation list {} in force on the running node ({} newly revoked; their sessions closed)",
            v["crl_number"],
            v["crl_number"],
            v["newly_revoked"].as_array().map_or(0, Vec::len)
        )),
        200 => Ok(format!(
            "失効リスト番号 {} は古いため変更なし / list {} is not newer than the list in force ({}); nothing changed",
            v["offered"], v["offered"], v["crl_number"]
        )),
        _ => {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or(body);
            Err(Exit::bad_input(format!("HTTP {status}: {msg}")))
        }
    }
}

/// One `POST /api/v1/crl` over plain HTTP/1.1 on loopback.
fn post(addr: std::net::SocketAddr, token: &str, der: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let head = format!(
        "POST /api/v1/crl HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/pkix-crl\r\nContent-Length: {}\r\n\r\n",
        der.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(der)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Chunked replies: the JSON is the one chunk between size lines.
    let body = match body.find('{') {
        Some(i) => body[i..body.rfind('}').map_or(body.len(), |j| j + 1)].to_string(),
        None => body.to_string(),
    };
    Ok((status, body))
}
