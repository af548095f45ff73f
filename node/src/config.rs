//! Configuration in two steps: the TOML file is parsed into [`RawConfig`]
//! (serde, unknown keys refused) and then checked into one [`Config`] whose
//! values are all in range, with relative paths resolved against the file's
//! directory. Nothing is started or bound before [`Config::load`] succeeds.
//!
//! Errors are values of [`ConfigError`] and render as one line each:
//! `file:line:col: message` for syntax errors and unknown keys (with the
//! nearest valid key suggested), and `file: key = value: allowed range` for
//! out-of-range values (I-1..I-3). The documented defaults live in
//! `deploy/kizuna.example.toml` and in the `default_*` functions below.

use crdt::engine::EngineConfig;
use crdt::{NodeId, Role};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_NET_LISTEN: &str = "0.0.0.0:7700";
pub const DEFAULT_HTTP_BIND: &str = "127.0.0.1:7780";
pub const DEFAULT_METRICS_BIND: &str = "127.0.0.1:7781";
pub const DEFAULT_SMTP_PORT: u16 = 25;
pub const DEFAULT_MAIL_LEASE_MS: u64 = 5 * 60_000;
pub const DEFAULT_MAIL_TAKEOVER_MS: u64 = 10 * 60_000;
/// Allowed range for the mail lease and takeover intervals.
pub const INTERVAL_MS_RANGE: (u64, u64) = (1_000, 86_400_000);
/// Config files larger than this are refused before parsing.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {reason}")]
    Read { path: String, reason: String },
    /// TOML syntax or type error, located.
    #[error("{path}:{line}:{col}: {message}")]
    Syntax {
        path: String,
        line: usize,
        col: usize,
        message: String,
    },
    /// A key no section knows (I-2).
    #[error("{path}:{line}:{col}: unknown key `{key}`{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownKey {
        path: String,
        line: usize,
        col: usize,
        key: String,
        suggestion: Option<String>,
    },
    /// A value outside its allowed range (I-3).
    #[error("{path}: {key} = {value}: out of range (allowed {allowed})")]
    OutOfRange {
        path: String,
        key: String,
        value: String,
        allowed: String,
    },
    #[error("{path}: {key} = {value}: {reason}")]
    Invalid {
        path: String,
        key: String,
        value: String,
        reason: String,
    },
}

// ----- raw file -------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub certs: RawCerts,
    #[serde(default)]
    pub net: RawNet,
    #[serde(default)]
    pub http: RawHttp,
    pub card: Option<RawCard>,
    pub smtp: Option<RawSmtp>,
    #[serde(default)]
    pub node: RawNode,
    pub metrics: Option<RawMetrics>,
    #[serde(default)]
    pub storage: RawStorage,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub enabled: Option<bool>,
    pub bind: Option<String>,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub encrypt: Option<bool>,
    pub key_file: Option<PathBuf>,
    pub key_credential: Option<String>,
    pub key_prompt: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCerts {
    pub dir: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNet {
    pub listen: Option<String>,
    pub mdns: Option<bool>,
    #[serde(default)]
    pub static_peers: Vec<RawPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub node_id: String,
    pub addr: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub bind: Option<String>,
    /// Serve plain HTTP on a non-loopback address (default false: refused).
    pub allow_plain_http: Option<bool>,
    /// Host names (besides IP literals and `localhost`) the browser may
    /// use to reach this node.
    pub hosts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCard {
    /// Default: true when the `[card]` table is present.
    pub enabled: Option<bool>,
    pub reader: Option<String>,
    /// Card profile TOML (aid, file_id, offset, length, encoding).
    pub profile: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    pub host: String,
    pub port: Option<i64>,
    pub from: String,
    /// `starttls`, `implicit` or `none`.
    pub tls: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub templates: std::collections::BTreeMap<String, crdt::mailtext::MailTemplate>,
    pub timeout_secs: Option<i64>,
    pub data_timeout_secs: Option<i64>,
    pub max_concurrent: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub shelter_id: Option<String>,
    pub mail_primary: Option<bool>,
    pub mail_lease_ms: Option<i64>,
    pub mail_takeover_ms: Option<i64>,
}

// ----- validated ------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file it came from (for messages).
    pub source: PathBuf,
    pub data_dir: PathBuf,
    pub certs: CertPaths,
    pub net: NetConfig,
    pub http: HttpConfig,
    pub card: CardConfig,
    pub smtp: Option<SmtpConfig>,
    pub node: NodeConfig,
    pub metrics: MetricsConfig,
    pub storage: StorageConfig,
}

/// The Prometheus endpoint (`node::metrics`): on when the `[metrics]` table
/// is present, on loopback by default; a bind address anyone else can
/// reach needs a bearer token file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub bind: SocketAddr,
    /// File holding the bearer token scrapers must send (resolved against
    /// the config file's directory). Read at start.
    pub token_file: Option<PathBuf>,
}

/// Data at rest (`[storage]`, see [`crate::atrest`]): whether the
/// database is encrypted, and where the storage key comes from (which
/// also unseals a sealed node key).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StorageConfig {
    /// `None`: the role's default ([`StorageConfig::encrypt_for`]).
    pub encrypt: Option<bool>,
    pub key: Option<certs::storagekey::KeySource>,
}

impl StorageConfig {
    /// Encrypt at rest? Ambulance tablets do unless told otherwise (they
    /// carry medical profiles and get lost); other roles when asked.
    pub fn encrypt_for(&self, role: Role) -> bool {
        self.encrypt.unwrap_or(role == Role::Ambulance)
    }

    /// The refusal when a role that encrypts has no storage key (`run`
    /// and `config check` say the same).
    pub fn missing_key(role: Role) -> String {
        format!(
            "{role} ノードは保存データを暗号化します。[storage] に key_file, key_credential または key_prompt を設定してください / {role} nodes encrypt their data at rest: set the storage key in [storage] (key_file, key_credential or key_prompt), or encrypt = false"
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub listen: SocketAddr,
    pub mdns: bool,
    pub static_peers: Vec<StaticPeer>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticPeer {
    pub node_id: NodeId,
    /// `host:port`; the host may be a name, resolved when dialing.
    pub addr: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    pub bind: SocketAddr,
    /// Plain HTTP on a non-loopback `bind` was explicitly allowed.
    pub allow_plain_http: bool,
    /// Extra host names accepted in `Host` (DNS-rebinding guard).
    pub hosts: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CardConfig {
    /// Whether `kizuna run` watches a card reader: true when the `[card]`
    /// table is present, unless it says `enabled = false`.
    pub enabled: bool,
    /// PC/SC reader name; `None` = the first reader found.
    pub reader: Option<String>,
    /// Card profile file (resolved against the config file's directory);
    /// `None` = the synthetic default profile.
    pub profile: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub from: String,
    /// Default: `implicit` on port 465, else `starttls`; plaintext only
    /// with `tls = "none"`.
    pub tls: SmtpTlsMode,
    /// PEM file of the CA roots to trust (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// The name the relay's certificate must carry (default: `host`).
    pub server_name: Option<String>,
    /// AUTH user; needs `password_file` and TLS.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Family mail templates by language (`ja`, `en`), replacing the
    /// built-in ones; see `crdt::mailtext`.
    pub templates: std::collections::BTreeMap<String, crdt::mailtext::MailTemplate>,
    /// Connect timeout and the timeout for each reply before the message
    /// is sent, and for each write (default 30 s).
    pub timeout_secs: u64,
    /// Timeout for the reply to the final "." (default 120 s); expiry
    /// there makes the outcome indeterminate.
    pub data_timeout_secs: u64,
    /// Sends in flight at once (default 4).
    pub max_concurrent: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpTlsMode {
    None,
    StartTls,
    Implicit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub shelter_id: Option<String>,
    pub mail_primary: bool,
    pub mail_lease_ms: u64,
    pub mail_takeover_ms: u64,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let read_err = |reason: String| ConfigError::Read {
            path: p.clone(),
            reason,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| read_err(e.to_string()))?
            .len();
        if len > MAX_CONFIG_BYTES {
            return Err(read_err(format!(
                "{len} bytes, larger than the {MAX_CONFIG_BYTES}-byte limit"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            read_err(format!(
                "not valid UTF-8 at byte {}",
                e.utf8_error().valid_up_to()
            ))
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` names it in errors and
    /// anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&p, text, &e))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        validate(raw, &p, &base, path)
    }

    /// The engine settings for this node, given the identity from its
    /// verified certificate.
    pub fn engine_config(
        &self,
        node_id: NodeId,
        role: Role,
        trust: crdt::signing::Trust,
    ) -> EngineConfig {
        let mut cfg = EngineConfig::new(node_id, role, trust);
        cfg.shelter_id = self.shelter_id(&cfg.node_id, role);
        cfg.mail_primary = self.node.mail_primary;
        cfg.mail_lease_ms = self.node.mail_lease_ms;
        cfg.mail_takeover_ms = self.node.mail_takeover_ms;
        cfg.build_threads = crate::run::cores();
        if let Some(smtp) = self.smtp.as_ref().filter(|s| !s.templates.is_empty()) {
            let mut t = crdt::mailtext::MailTemplates::default();
            for (lang, tpl) in &smtp.templates {
                t.0.insert(lang.clone(), tpl.clone());
            }
            cfg.mail_templates = t;
        }
        cfg
    }

    /// The shelter this node serves: the configured one, or (shelter role)
    /// its node id.
    pub fn shelter_id(&self, node_id: &NodeId, role: Role) -> Option<String> {
        match &self.node.shelter_id {
            Some(s) => Some(s.clone()),
            None => (role == Role::Shelter).then(|| node_id.as_str().to_string()),
        }
    }

    /// A shelter node records presence at its own shelter, and every peer
    /// takes that to be its node id (the identity its certificate binds;
    /// see `crdt::content`): a configured `shelter_id` that differs would
    /// have all of its check-ins refused along the mesh, so the node does
    /// not start with it.
    pub fn shelter_id_error(&self, node_id: &NodeId, role: Role) -> Option<String> {
        let s = self.node.shelter_id.as_ref()?;
        (role == Role::Shelter && s != node_id.as_str()).then(|| {
            format!(
                "[node] shelter_id = {s:?} は証明書のノード ID {node_id} と異なります。避難所ノードの避難所 ID はノード ID です（他のノードがチェックインを拒否します） / [node] shelter_id {s:?} differs from this shelter node's certified id {node_id}: a shelter node's shelter is its node id (peers refuse check-ins at any other); remove the setting or issue the certificate for {s}"
            )
        })
    }

    /// Checks that depend on the role from the certificate. Returns
    /// warnings for settings that are ignored for this role.
    pub fn check_role(&self, role: Role) -> Vec<String> {
        let mut w = Vec::new();
        if self.smtp.is_some() && role != Role::Hq {
            w.push(format!(
                "[smtp] is ignored on a {role} node (only hq sends family mail)"
            ));
        }
        if role == Role::Ambulance && self.storage.encrypt == Some(false) {
            w.push(
                "[storage] encrypt = false on an ambulance node: medical profiles are stored in plaintext"
                    .to_string(),
            );
        }
        if self.node.shelter_id.is_some() && role != Role::Shelter {
            w.push(format!("[node] shelter_id is ignored on a {role} node"));
        }
        w
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

fn toml_error(path: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
    let msg = e.message().trim().to_string();
    // serde's message: "unknown field `x`, expected one of `a`, `b`" or
    // "unknown field `x`, expected `a`" or "..., there are no fields".
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some(end) = rest.find('`') {
            let key = rest[..end].to_string();
            let valid: Vec<&str> = rest[end + 1..].split('`').skip(1).step_by(2).collect();
            return ConfigError::UnknownKey {
                path: path.into(),
                line,
                col,
                suggestion: nearest(&key, &valid),
                key,
            };
        }
    }
    ConfigError::Syntax {
        path: path.into(),
        line,
        col,
        message: msg,
    }
}

/// The valid key closest to `key` by edit distance, if reasonably close.
pub fn nearest(key: &str, valid: &[&str]) -> Option<String> {
    valid
        .iter()
        .map(|v| (edit_distance(key, v), *v))
        .min()
        .filter(|(d, v)| *d <= (v.chars().count().max(key.chars().count()) / 2).max(2))
        .map(|(_, v)| v.to_string())
}

/// Levenshtein distance over chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn port_in_range(path: &str, key: &str, value: i64) -> Result<u16, ConfigError> {
    if (1..=65535).contains(&value) {
        Ok(value as u16)
    } else {
        Err(ConfigError::OutOfRange {
            path: path.into(),
            key: key.into(),
            value: value.to_string(),
            allowed: "1..=65535".into(),
        })
    }
}

/// Splits `host:port` (IPv6 as `[::1]:port`) and checks the port range.
fn host_port(path: &str, key: &str, s: &str) -> Result<(String, u16), ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid {
        path: path.into(),
        key: key.into(),
        value: format!("{s:?}"),
        reason: reason.into(),
    };
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| invalid("expected host:port"))?;
    if host.is_empty() {
        return Err(invalid("expected host:port"));
    }
    let port: i64 = port.parse().map_err(|_| invalid("port must be a number"))?;
    Ok((host.to_string(), port_in_range(path, key, port)?))
}

fn socket_addr(path: &str, key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    host_port(path, key, s)?;
    s.parse().map_err(|_| ConfigError::Invalid {
        path: path.into(),
        key: key.into(),
        value: format!("{s:?}"),
        reason: "expected an IP address and port, e.g. 127.0.0.1:7780".into(),
    })
}

fn interval(path: &str, key: &str, v: Option<i64>, default: u64) -> Result<u64, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let (lo, hi) = INTERVAL_MS_RANGE;
    if v < lo as i64 || v > hi as i64 {
        return Err(ConfigError::OutOfRange {
            path: path.into(),
            key: key.into(),
            value: v.to_string(),
            allowed: format!("{lo}..={hi}"),
        });
    }
    Ok(v as u64)
}

fn validate(raw: RawConfig, p: &str, base: &Path, source: &Path) -> Result<Config, ConfigError> {
    let abs = |q: PathBuf| if q.is_absolute() { q } else { base.join(q) };
    let data_dir = abs(raw.data_dir.ok_or_else(|| ConfigError::Invalid {
        path: p.into(),
        key: "data_dir".into(),
        value: "(missing)".into(),
        reason: "required: the directory holding kizuna.db".into(),
    })?);
    let c = raw.certs;
    let certs = match (c.dir, c.cert, c.key, c.ca) {
        (dir, None, None, None) => {
            let d = dir.map(abs).unwrap_or_else(|| data_dir.join("certs"));
            CertPaths {
                cert: d.join("node.crt.pem"),
                key: d.join("node.key.pem"),
                ca: d.join("ca.crt.pem"),
            }
        }
        (None, Some(cert), Some(key), Some(ca)) => CertPaths {
            cert: abs(cert),
            key: abs(key),
            ca: abs(ca),
        },
        _ => {
            return Err(ConfigError::Invalid {
                path: p.into(),
                key: "certs".into(),
                value: "(mixed)".into(),
                reason: "give either `dir` or all of `cert`, `key` and `ca`".into(),
            })
        }
    };
    let listen = socket_addr(
        p,
        "net.listen",
        raw.net.listen.as_deref().unwrap_or(DEFAULT_NET_LISTEN),
    )?;
    let mut static_peers = Vec::new();
    for (i, peer) in raw.net.static_peers.into_iter().enumerate() {
        let node_id = NodeId::new(peer.node_id.clone()).map_err(|e| ConfigError::Invalid {
            path: p.into(),
            key: format!("net.static_peers[{i}].node_id"),
            value: format!("{:?}", peer.node_id),
            reason: e.to_string(),
        })?;
        host_port(p, &format!("net.static_peers[{i}].addr"), &peer.addr)?;
        static_peers.push(StaticPeer {
            node_id,
            addr: peer.addr,
        });
    }
    let bind = socket_addr(
        p,
        "http.bind",
        raw.http.bind.as_deref().unwrap_or(DEFAULT_HTTP_BIND),
    )?;
    let allow_plain_http = raw.http.allow_plain_http.unwrap_or(false);
    // Session cookies, passwords and medical profiles would cross the
    // network in clear text: refused unless the operator says otherwise.
    if !bind.ip().is_loopback() && !allow_plain_http {
        return Err(ConfigError::Invalid {
            path: p.into(),
            key: "http.bind".into(),
            value: bind.to_string(),
            reason: "a non-loopback address serves plain HTTP (no TLS): passwords, sessions and \
                     medical data would cross the network unencrypted; keep the API on loopback \
                     (put a TLS proxy in front) or set http.allow_plain_http = true"
                .into(),
        });
    }
    let hosts = raw.http.hosts.unwrap_or_default();
    for (i, h) in hosts.iter().enumerate() {
        if h.is_empty()
            || !h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(ConfigError::Invalid {
                path: p.into(),
                key: format!("http.hosts[{i}]"),
                value: h.clone(),
                reason: "a host name (letters, digits, dots, hyphens)".into(),
            });
        }
    }
    let smtp = match raw.smtp {
        None => None,
        Some(s) => {
            if s.host.trim().is_empty() {
                return Err(ConfigError::Invalid {
                    path: p.into(),
                    key: "smtp.host".into(),
                    value: "\"\"".into(),
                    reason: "must not be empty".into(),
                });
            }
            crdt::text::check_email("smtp.from", &s.from).map_err(|e| ConfigError::Invalid {
                path: p.into(),
                key: "smtp.from".into(),
                value: format!("{:?}", s.from),
                reason: e.to_string(),
            })?;
            let invalid = |key: &str, value: String, reason: &str| ConfigError::Invalid {
                path: p.into(),
                key: key.into(),
                value,
                reason: reason.into(),
            };
            let port = port_in_range(p, "smtp.port", s.port.unwrap_or(DEFAULT_SMTP_PORT as i64))?;
            let tls = match s.tls.as_deref() {
                None if port == 465 => SmtpTlsMode::Implicit,
                None | Some("starttls") => SmtpTlsMode::StartTls,
                Some("implicit") => SmtpTlsMode::Implicit,
                Some("none") => SmtpTlsMode::None,
                Some(other) => {
                    return Err(invalid(
                        "smtp.tls",
                        format!("{other:?}"),
                        "one of \"starttls\", \"implicit\", \"none\"",
                    ))
                }
            };
            if s.username.is_some() != s.password_file.is_some() {
                return Err(invalid(
                    "smtp.username",
                    format!("{:?}", s.username),
                    "AUTH needs both username and password_file",
                ));
            }
            if s.username.is_some() && tls == SmtpTlsMode::None {
                return Err(invalid(
                    "smtp.tls",
                    "\"none\"".into(),
                    "AUTH over plaintext would send the password in the clear",
                ));
            }
            if let Some(u) = &s.username {
                if u.is_empty() || u.chars().any(|c| c.is_control()) {
                    return Err(invalid(
                        "smtp.username",
                        format!("{u:?}"),
                        "empty or control characters",
                    ));
                }
            }
            for (lang, tpl) in &s.templates {
                tpl.check()
                    .map_err(|e| invalid(&format!("smtp.templates.{lang}"), String::new(), &e))?;
            }
            let secs = |key: &str, v: Option<i64>, default: i64| -> Result<u64, ConfigError> {
                let v = v.unwrap_or(default);
                if !(1..=3600).contains(&v) {
                    return Err(ConfigError::Invalid {
                        path: p.into(),
                        key: key.into(),
                        value: v.to_string(),
                        reason: "must be 1..=3600".into(),
                    });
                }
                Ok(v as u64)
            };
            Some(SmtpConfig {
                port,
                host: s.host,
                from: s.from,
                tls,
                ca_file: s.ca_file.map(abs),
                server_name: s.server_name,
                username: s.username,
                password_file: s.password_file.map(abs),
                templates: s.templates,
                timeout_secs: secs("smtp.timeout_secs", s.timeout_secs, 30)?,
                data_timeout_secs: secs("smtp.data_timeout_secs", s.data_timeout_secs, 120)?,
                max_concurrent: secs("smtp.max_concurrent", s.max_concurrent, 4)?.min(64) as usize,
            })
        }
    };
    if let Some(s) = &raw.node.shelter_id {
        crdt::ids::check_id_str(s).map_err(|r| ConfigError::Invalid {
            path: p.into(),
            key: "node.shelter_id".into(),
            value: format!("{s:?}"),
            reason: r.into(),
        })?;
    }
    let node = NodeConfig {
        shelter_id: raw.node.shelter_id,
        mail_primary: raw.node.mail_primary.unwrap_or(true),
        mail_lease_ms: interval(
            p,
            "node.mail_lease_ms",
            raw.node.mail_lease_ms,
            DEFAULT_MAIL_LEASE_MS,
        )?,
        mail_takeover_ms: interval(
            p,
            "node.mail_takeover_ms",
            raw.node.mail_takeover_ms,
            DEFAULT_MAIL_TAKEOVER_MS,
        )?,
    };
    // Like `[card]`: the table's presence turns the endpoint on, so nodes
    // sharing one loopback (the demo, tests) never fight over its port.
    let present = raw.metrics.is_some();
    let m = raw.metrics.unwrap_or_default();
    let metrics = MetricsConfig {
        enabled: m.enabled.unwrap_or(present),
        bind: socket_addr(
            p,
            "metrics.bind",
            m.bind.as_deref().unwrap_or(DEFAULT_METRICS_BIND),
        )?,
        token_file: m.token_file.map(abs),
    };
    if metrics.enabled && !metrics.bind.ip().is_loopback() && metrics.token_file.is_none() {
        return Err(ConfigError::Invalid {
            path: p.into(),
            key: "metrics.bind".into(),
            value: format!("{:?}", metrics.bind.to_string()),
            reason: "a metrics address off loopback needs metrics.token_file (a bearer token for the scraper)".into(),
        });
    }
    let storage = {
        let r = raw.storage;
        let invalid = |key: &str, value: String, reason: &str| ConfigError::Invalid {
            path: p.into(),
            key: key.into(),
            value,
            reason: reason.into(),
        };
        let mut sources = Vec::new();
        if let Some(f) = r.key_file {
            sources.push(certs::storagekey::KeySource::File(abs(f)));
        }
        if let Some(n) = r.key_credential {
            if n.is_empty()
                || n.contains('/')
                || n == "."
                || n == ".."
                || n.chars().any(char::is_control)
            {
                return Err(invalid(
                    "storage.key_credential",
                    format!("{n:?}"),
                    "a credential name (a file name in $CREDENTIALS_DIRECTORY)",
                ));
            }
            sources.push(certs::storagekey::KeySource::Credential(n));
        }
        if r.key_prompt == Some(true) {
            sources.push(certs::storagekey::KeySource::Prompt);
        }
        if sources.len() > 1 {
            return Err(invalid(
                "storage",
                "(several keys)".into(),
                "give one of key_file, key_credential and key_prompt",
            ));
        }
        let key = sources.pop();
        if r.encrypt == Some(true) && key.is_none() {
            return Err(invalid(
                "storage.encrypt",
                "true".into(),
                "needs the storage key: key_file, key_credential or key_prompt",
            ));
        }
        StorageConfig {
            encrypt: r.encrypt,
            key,
        }
    };
    Ok(Config {
        source: source.to_path_buf(),
        data_dir,
        certs,
        net: NetConfig {
            listen,
            mdns: raw.net.mdns.unwrap_or(true),
            static_peers,
        },
        http: HttpConfig {
            bind,
            allow_plain_http,
            hosts: hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect(),
        },
        card: match raw.card {
            None => CardConfig::default(),
            Some(c) => CardConfig {
                enabled: c.enabled.unwrap_or(true),
                reader: c.reader.filter(|r| !r.trim().is_empty()),
                profile: c.profile.map(abs),
            },
        },
        smtp,
        node,
        metrics,
        storage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/kizuna/kizuna.toml"))
    }

    #[test]
    fn minimal_gets_documented_defaults() {
        let c = parse("data_dir = \"data\"\n").unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/kizuna/data"));
        assert_eq!(
            c.certs.cert,
            PathBuf::from("/etc/kizuna/data/certs/node.crt.pem")
        );
        assert_eq!(c.net.listen.to_string(), DEFAULT_NET_LISTEN);
        assert_eq!(c.http.bind.to_string(), DEFAULT_HTTP_BIND);
        assert!(c.net.mdns);
        assert!(c.node.mail_primary);
        assert_eq!(c.smtp, None);
    }

    #[test]
    fn card_table_enables_the_reader() {
        let c = parse("data_dir = \"data\"\n").unwrap();
        assert!(!c.card.enabled);
        let c = parse("data_dir = \"data\"\n[card]\n").unwrap();
        assert!(c.card.enabled);
        assert_eq!(c.card.reader, None);
        let c = parse(
            "data_dir = \"data\"\n[card]\nenabled = false\nreader = \"R 00\"\nprofile = \"p.toml\"\n",
        )
        .unwrap();
        assert!(!c.card.enabled);
        assert_eq!(c.card.reader.as_deref(), Some("R 00"));
        assert_eq!(c.card.profile, Some(PathBuf::from("/etc/kizuna/p.toml")));
        assert!(matches!(
            parse("data_dir = \"data\"\n[card]\nenable = true\n"),
            Err(ConfigError::UnknownKey { .. })
        ));
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../deploy/kizuna.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.net.static_peers.len(), 1);
        assert_eq!(c.smtp.as_ref().unwrap().port, 587);
    }

    #[test]
    fn a_shelter_node_records_presence_only_at_its_certified_id() {
        let c = parse(
            r#"
data_dir = "/var/lib/kizuna"
[certs]
cert = "a.pem"
key = "b.pem"
ca = "/ca.pem"
[node]
shelter_id = "s-01"
"#,
        )
        .unwrap();
        let id = |s: &str| NodeId::new(s).unwrap();
        assert_eq!(c.shelter_id_error(&id("s-01"), Role::Shelter), None);
        let e = c.shelter_id_error(&id("shelter-1"), Role::Shelter).unwrap();
        assert!(e.contains("shelter-1") && e.contains("s-01"), "{e}");
        // Ignored (with a warning) on other roles.
        assert_eq!(c.shelter_id_error(&id("hq-1"), Role::Hq), None);
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"
data_dir = "/var/lib/kizuna"
[certs]
cert = "a.pem"
key = "b.pem"
ca = "/ca.pem"
[net]
listen = "[::]:7701"
mdns = false
[[net.static_peers]]
node_id = "hq-1"
addr = "hq.example.jp:7700"
[http]
bind = "127.0.0.1:8080"
[smtp]
host = "smtp.example.jp"
port = 587
from = "kizuna@example.jp"
[node]
shelter_id = "s-01"
mail_primary = false
mail_lease_ms = 60000
"#,
        )
        .unwrap();
        assert_eq!(c.certs.key, PathBuf::from("/etc/kizuna/b.pem"));
        assert_eq!(c.certs.ca, PathBuf::from("/ca.pem"));
        assert_eq!(c.net.static_peers[0].node_id.as_str(), "hq-1");
        assert_eq!(c.node.mail_lease_ms, 60000);
        let e = c.engine_config(
            NodeId::new("s-01").unwrap(),
            Role::Shelter,
            crdt::signing::Trust::offline(),
        );
        assert!(!e.mail_primary);
    }

    #[test]
    fn syntax_error_is_located() {
        let e = parse("data_dir = \"x\"\n[net]\nlisten = = 3\n").unwrap_err();
        match &e {
            ConfigError::Syntax { line, col, .. } => {
                assert_eq!(*line, 3);
                assert!(*col >= 8, "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string().starts_with("/etc/kizuna/kizuna.toml:3:"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_named_with_suggestion() {
        let e =
            parse("data_dir = \"x\"\n[net]\nlisten = \"0.0.0.0:1\"\nmnds = true\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("unknown key `mnds`"), "{s}");
        assert!(s.contains("did you mean `mdns`?"), "{s}");
        assert!(s.starts_with("/etc/kizuna/kizuna.toml:4:1:"), "{s}");
        let e = parse("data_dri = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("did you mean `data_dir`?"), "{e}");
        let e = parse("data_dir = \"x\"\n[http]\nzzzzzzzzzzzz = 1\n").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::UnknownKey {
                    suggestion: None,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn ports_out_of_range() {
        for (text, key, value) in [
            ("[net]\nlisten = \"0.0.0.0:0\"", "net.listen", "0"),
            ("[http]\nbind = \"127.0.0.1:70000\"", "http.bind", "70000"),
            (
                "[smtp]\nhost = \"h\"\nfrom = \"a@b.jp\"\nport = 0",
                "smtp.port",
                "0",
            ),
            (
                "[[net.static_peers]]\nnode_id = \"hq\"\naddr = \"h:99999\"",
                "net.static_peers[0].addr",
                "99999",
            ),
        ] {
            let e = parse(&format!("data_dir = \"x\"\n{text}\n")).unwrap_err();
            assert_eq!(
                e,
                ConfigError::OutOfRange {
                    path: "/etc/kizuna/kizuna.toml".into(),
                    key: key.into(),
                    value: value.into(),
                    allowed: "1..=65535".into()
                }
            );
        }
    }

    #[test]
    fn intervals_out_of_range() {
        for v in ["0", "-5", "999999999999"] {
            let e = parse(&format!(
                "data_dir = \"x\"\n[node]\nmail_takeover_ms = {v}\n"
            ))
            .unwrap_err();
            let s = e.to_string();
            assert!(
                s.contains("node.mail_takeover_ms")
                    && s.contains(v)
                    && s.contains("1000..=86400000"),
                "{s}"
            );
        }
    }

    #[test]
    fn invalid_values() {
        assert!(
            matches!(parse(""), Err(ConfigError::Invalid { ref key, .. }) if key == "data_dir")
        );
        let e = parse("data_dir = \"x\"\n[certs]\ndir = \"c\"\ncert = \"a\"\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { ref key, .. } if key == "certs"),
            "{e}"
        );
        let e = parse("data_dir = \"x\"\n[smtp]\nhost = \"h\"\nfrom = \"a\\r\\nBcc: x@y\"\n")
            .unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { ref key, .. } if key == "smtp.from"),
            "{e}"
        );
        let e = parse("data_dir = \"x\"\n[http]\nbind = \"localhost:80\"\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { ref key, .. } if key == "http.bind"),
            "{e}"
        );
        let e = parse("data_dir = 3\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 1, .. }), "{e}");
        // Plain HTTP off loopback only when explicitly allowed.
        let e = parse("data_dir = \"x\"\n[http]\nbind = \"0.0.0.0:7780\"\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { ref key, ref reason, .. }
                if key == "http.bind" && reason.contains("allow_plain_http")),
            "{e}"
        );
        let c = parse(
            "data_dir = \"x\"\n[http]\nbind = \"0.0.0.0:7780\"\nallow_plain_http = true\nhosts = [\"Desk1.local\"]\n",
        )
        .unwrap();
        assert!(c.http.allow_plain_http);
        assert_eq!(c.http.hosts, ["desk1.local"]);
        let e = parse("data_dir = \"x\"\n[http]\nhosts = [\"a b\"]\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { ref key, .. } if key == "http.hosts[0]"),
            "{e}"
        );
    }

    #[test]
    fn metrics_table_turns_the_endpoint_on() {
        let c = parse("data_dir = \"d\"\n").unwrap();
        assert!(!c.metrics.enabled);
        let c = parse("data_dir = \"d\"\n[metrics]\n").unwrap();
        assert!(c.metrics.enabled);
        assert_eq!(c.metrics.bind.to_string(), DEFAULT_METRICS_BIND);
        let c = parse("data_dir = \"d\"\n[metrics]\nbind = \"0.0.0.0:9100\"\ntoken_file = \"t\"\n")
            .unwrap();
        assert_eq!(c.metrics.token_file, Some(PathBuf::from("/etc/kizuna/t")));
        let e = parse("data_dir = \"d\"\n[metrics]\nbind = \"0.0.0.0:9100\"\n").unwrap_err();
        assert!(e.to_string().contains("metrics.token_file"), "{e}");
        // Switched off, an open address needs no token.
        let c = parse("data_dir = \"d\"\n[metrics]\nenabled = false\nbind = \"0.0.0.0:9100\"\n")
            .unwrap();
        assert!(!c.metrics.enabled);
    }

    #[test]
    fn storage_encryption_by_role_and_key_sources() {
        use certs::storagekey::KeySource;
        let c = parse("data_dir = \"d\"\n").unwrap();
        assert_eq!(c.storage, StorageConfig::default());
        assert!(c.storage.encrypt_for(Role::Ambulance));
        assert!(!c.storage.encrypt_for(Role::Shelter));
        let c = parse("data_dir = \"d\"\n[storage]\nencrypt = true\nkey_file = \"k\"\n").unwrap();
        assert!(c.storage.encrypt_for(Role::Hq));
        assert_eq!(
            c.storage.key,
            Some(KeySource::File(PathBuf::from("/etc/kizuna/k")))
        );
        let c = parse("data_dir = \"d\"\n[storage]\nencrypt = false\n").unwrap();
        assert!(!c.storage.encrypt_for(Role::Ambulance));
        let c = parse("data_dir = \"d\"\n[storage]\nkey_credential = \"kizuna-storage-key\"\n")
            .unwrap();
        assert_eq!(
            c.storage.key,
            Some(KeySource::Credential("kizuna-storage-key".into()))
        );
        let c = parse("data_dir = \"d\"\n[storage]\nkey_prompt = true\n").unwrap();
        assert_eq!(c.storage.key, Some(KeySource::Prompt));
        for (bad, key) in [
            ("encrypt = true", "storage.encrypt"),
            ("key_file = \"a\"\nkey_prompt = true", "storage"),
            ("key_credential = \"../x\"", "storage.key_credential"),
        ] {
            let e = parse(&format!("data_dir = \"d\"\n[storage]\n{bad}\n")).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { key: k, .. } if k == key),
                "{bad}: {e}"
            );
        }
        assert!(matches!(
            parse("data_dir = \"d\"\n[storage]\nkey = \"x\"\n"),
            Err(ConfigError::UnknownKey { .. })
        ));
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("mnds", "mdns"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(nearest("bnid", &["bind"]), Some("bind".into()));
    }
}
