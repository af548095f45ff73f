//! Real `kizuna` processes for the node's integration tests: a node's
//! directory and config, `kizuna run` started and stopped by signal, one
//! HTTP/1.1 request at a time against its API, and polling with a deadline
//! (never a sleep as synchronisation).

use super::{free_port, free_udp_port, kizuna_bin};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn poll<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Resp {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<Resp> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Resp {
        status,
        body: body.to_string(),
    })
}

pub fn run_kizuna(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(kizuna_bin());
    c.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run kizuna")
}

pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "kizuna failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// hq-1 in `dir`, whose certificates are already there: the registry
/// `csv` imported and an operator added; not started.
pub fn hq_from_csv(dir: &Path, csv: &Path) -> Node {
    let mut n = Node::new(dir, None, "");
    ok(run_kizuna(
        &[
            "registry",
            "import",
            "--data-dir",
            n.data().to_str().unwrap(),
            csv.to_str().unwrap(),
            "--node-id",
            "hq-1",
        ],
        &[],
    ));
    n.add_operator();
    n
}

/// A node's directory: `certs/`, `data/`, `tmp/` (its TMPDIR),
/// `kizuna.toml`, `kizuna.log`.
pub struct Node {
    pub dir: PathBuf,
    pub http: SocketAddr,
    pub quic: SocketAddr,
    pub token: String,
    pub child: Option<Child>,
    pub envs: Vec<(String, PathBuf)>,
}

impl Node {
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("kizuna.toml")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("kizuna.log")
    }

    /// Writes the config (`extra` appended) and adds an operator.
    pub fn new(dir: &Path, static_peer: Option<SocketAddr>, extra: &str) -> Node {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let quic: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let mut cfg = format!(
            "data_dir = \"data\"\n[certs]\ndir = \"certs\"\n[net]\nlisten = \"{quic}\"\nmdns = false\n"
        );
        if let Some(p) = static_peer {
            cfg.push_str(&format!(
                "[[net.static_peers]]\nnode_id = \"hq-1\"\naddr = \"{p}\"\n"
            ));
        }
        cfg.push_str(&format!("[http]\nbind = \"{http}\"\n{extra}"));
        std::fs::write(dir.join("kizuna.toml"), cfg).unwrap();
        Node {
            dir: dir.to_path_buf(),
            http,
            quic,
            token: String::new(),
            child: None,
            envs: Vec::new(),
        }
    }

    pub fn add_operator(&mut self) {
        let data = self.data();
        self.token = ok(run_kizuna(
            &[
                "operator",
                "add",
                "--name",
                "t",
                "--data-dir",
                data.to_str().unwrap(),
            ],
            &[],
        ))
        .trim()
        .to_string();
    }

    pub fn command(&self) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let mut c = Command::new(kizuna_bin());
        c.arg("run")
            .arg("--config")
            .arg(self.config())
            // Everything the node and SQLite might log or spill.
            .env("RUST_LOG", "debug")
            .env("TMPDIR", self.dir.join("tmp"))
            .env("SQLITE_TMPDIR", self.dir.join("tmp"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    /// Starts `kizuna run` and waits for its API.
    pub fn start(&mut self) {
        let mut child = self.command().spawn().expect("spawn kizuna run");
        let auth = format!("Bearer {}", self.token);
        let addr = self.http;
        poll(Duration::from_secs(120), "the node's API", || {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "kizuna run exited ({st}): {}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            let r = http(
                addr,
                "GET",
                "/api/v1/status",
                &[("Authorization", &auth)],
                "",
            )?;
            (r.status == 200).then_some(())
        });
        self.child = Some(child);
    }

    /// `kizuna run` that must refuse to start: its exit code and output.
    pub fn refused(&self) -> (i32, String) {
        // Output to a file (no pipe to fill) and a generous deadline: a
        // node that starts instead of refusing fails the test, not hangs it.
        // Outside the node's directory: the callers snapshot it.
        let log = tempfile::NamedTempFile::new().unwrap();
        let out = log.path().to_path_buf();
        let f = log.reopen().unwrap();
        let mut child = self
            .command()
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "kizuna run did not refuse to start within 60 s:\n{}",
                    std::fs::read_to_string(&out).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        (status.code().unwrap_or(-1), text)
    }

    /// SIGTERM and wait: the node checkpoints and closes its store.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let st = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            assert!(st.success());
            let st = c.wait().unwrap();
            assert!(st.success(), "kizuna run ended with {st}");
        }
    }

    pub fn api(&self, method: &str, path: &str, body: &str) -> Resp {
        let auth = format!("Bearer {}", self.token);
        http(self.http, method, path, &[("Authorization", &auth)], body).expect("API answers")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
