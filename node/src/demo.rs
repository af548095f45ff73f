//! `kizuna demo`: a whole mesh on loopback in one command.
//!
//! Creates a CA and one certificate per node under the demo directory,
//! writes each node's config, generates a synthetic registry (Japanese
//! names with readings, from a small embedded list, seeded so a seed
//! always gives the same residents), imports it at headquarters, adds one
//! API operator per node, then runs `kizuna run --config …` as child
//! processes for hq, two shelters, a clinic and an ambulance. It waits
//! until every node's `/api/v1/status` answers, prints per node its role,
//! API URL and bearer token, and a one-time sign-in link that opens the
//! node's screen already signed in (JSON objects with `--json`), and on SIGINT or
//! SIGTERM stops every child with SIGTERM (SIGKILL after a grace period).
//!
//! Every non-hq node has hq as a static peer; mDNS is off so the demo
//! does not leak onto the LAN.

use crate::auth::Operators;
use crate::console::Exit;
use crate::driver::Driver;
use crate::import::COLUMNS;
use anyhow::{anyhow, Context};
use crdt::api::{Command, Operator};
use crdt::model::ShelterInfo;
use crdt::{NodeId, Role};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const FAMILY: [(&str, &str); 20] = [
    ("佐藤", "サトウ"),
    ("鈴木", "スズキ"),
    ("高橋", "タカハシ"),
    ("田中", "タナカ"),
    ("伊藤", "イトウ"),
    ("渡辺", "ワタナベ"),
    ("山本", "ヤマモト"),
    ("中村", "ナカムラ"),
    ("小林", "コバヤシ"),
    ("加藤", "カトウ"),
    ("吉田", "ヨシダ"),
    ("山田", "ヤマダ"),
    ("佐々木", "ササキ"),
    ("山口", "ヤマグチ"),
    ("松本", "マツモト"),
    ("井上", "イノウエ"),
    ("木村", "キムラ"),
    ("林", "ハヤシ"),
    ("斎藤", "サイトウ"),
    ("五十嵐", "イガラシ"),
];
const GIVEN: [(&str, &str); 20] = [
    ("太郎", "タロウ"),
    ("花子", "ハナコ"),
    ("一郎", "イチロウ"),
    ("美咲", "ミサキ"),
    ("健太", "ケンタ"),
    ("陽子", "ヨウコ"),
    ("翔太", "ショウタ"),
    ("さくら", "サクラ"),
    ("大輔", "ダイスケ"),
    ("恵子", "ケイコ"),
    ("誠", "マコト"),
    ("由美", "ユミ"),
    ("翼", "ツバサ"),
    ("結衣", "ユイ"),
    ("浩", "ヒロシ"),
    ("和子", "カズコ"),
    ("勇", "イサム"),
    ("千代", "チヨ"),
    ("蓮", "レン"),
    ("陽菜", "ヒナ"),
];
const TOWNS: [&str; 6] = ["旭町", "本町", "荒町", "東裏館", "月岡", "下保内"];

/// A synthetic registry CSV (the `registry import` format) with
/// `households` households of 1..=5 members. Every 3rd person has a card.
pub fn synthetic_registry(households: usize, seed: u64) -> String {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut pick = |n: usize| (rng.next_u32() as usize) % n;
    let mut out = COLUMNS.join(",");
    out.push('\n');
    let mut person = 0usize;
    for h in 0..households {
        let (fam, fam_kana) = FAMILY[pick(FAMILY.len())];
        let address = format!(
            "新潟県三条市{}{}-{}",
            TOWNS[pick(TOWNS.len())],
            1 + pick(9),
            1 + pick(30)
        );
        let members = 1 + pick(5);
        for _ in 0..members {
            person += 1;
            let (given, given_kana) = GIVEN[pick(GIVEN.len())];
            let year = 1930 + pick(90);
            let month = 1 + pick(12);
            let day = 1 + pick(28);
            // Some older residents written with era dates, as registries do.
            let birth = if year < 1989 && person.is_multiple_of(4) {
                format!("昭和{}年{month}月{day}日", year - 1925)
            } else {
                format!("{year:04}-{month:02}-{day:02}")
            };
            let card = if person.is_multiple_of(3) {
                format!("{:013}", 9_000_000_000_000u64 + person as u64)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "h{h:05},{address},p{person:06},{fam} {given},{fam_kana} {given_kana},{birth},{card}"
            );
        }
    }
    out
}

/// Registers shelters (id, name; capacity 300) in a stopped hq data
/// directory, as the demo does. Also used by the end-to-end tests.
pub fn put_shelters(
    hq_data: &std::path::Path,
    hq_id: &str,
    shelters: &[(&str, &str)],
) -> Result<(), Exit> {
    let (lock, store, ecfg) = crate::run::open_hq(hq_data, Some(hq_id))?;
    let driver = Driver::start(store, ecfg)?;
    for (id, name) in shelters {
        driver.command_blocking(
            format!("demo-shelter-{id}"),
            Operator("demo".into()),
            Command::PutShelter {
                shelter: ShelterInfo {
                    shelter_id: id.to_string(),
                    name: name.to_string(),
                    capacity: 300,
                    location: String::new(),
                    needs: String::new(),
                    ..Default::default()
                },
            },
        )?;
    }
    driver.shutdown()?;
    drop(lock);
    Ok(())
}

/// Demo medical profiles (consented; allergies, conditions, blood type)
/// for the first residents, so the ambulance and clinic views have data,
/// and pre-registered family contacts for a few, so headquarters plans
/// safety mail. Addresses use the reserved `example.jp` domain.
pub fn put_demo_profiles(
    hq_data: &std::path::Path,
    hq_id: &str,
    persons: usize,
) -> Result<(), Exit> {
    use crdt::api::MedicalUpdate;
    use crdt::model::{BloodType, ConsentBasis, Disclosure, FamilyContact, MedicalSection};
    let (lock, store, ecfg) = crate::run::open_hq(hq_data, Some(hq_id))?;
    let ids: Vec<String> = crdt::store::Store::persons(&store, persons, 0)?
        .into_iter()
        .map(|p| p.person_id)
        .collect();
    let driver = Driver::start(store, ecfg)?;
    const BLOOD: [BloodType; 4] = [
        BloodType::APos,
        BloodType::OPos,
        BloodType::BNeg,
        BloodType::AbPos,
    ];
    const ALLERGY: [&str; 3] = [
        "ペニシリン / penicillin",
        "そば / buckwheat",
        "造影剤 / contrast medium",
    ];
    const CONDITION: [&str; 3] = [
        "高血圧 / hypertension",
        "2型糖尿病 / type 2 diabetes",
        "心房細動 / atrial fibrillation",
    ];
    for (i, id) in ids.iter().enumerate() {
        let update = MedicalUpdate {
            blood_type: Some(BLOOD[i % BLOOD.len()]),
            consent: Some(ConsentBasis::Consented),
            add: vec![
                (MedicalSection::Allergy, ALLERGY[i % ALLERGY.len()].into()),
                (
                    MedicalSection::Condition,
                    CONDITION[i % CONDITION.len()].into(),
                ),
            ],
            ..Default::default()
        };
        driver.command_blocking(
            format!("demo-medical-{id}"),
            Operator("demo".into()),
            Command::PutMedical {
                person_id: id.clone(),
                update,
            },
        )?;
        // The rules made visible: every third resident has a consented
        // contact (mail goes out, in English for every ninth), the next
        // one a contact who never consented (no mail), and every sixth
        // from the third on asked for do-not-disclose although the
        // contact consented (no mail, left out of PFIF, 非開示 on the
        // roster).
        let (consent, do_not_disclose) = match i % 6 {
            0 | 3 => (true, false),
            1 | 4 => (false, false),
            2 => (true, true),
            _ => continue,
        };
        let contacts = vec![FamilyContact {
            contact_id: format!("c-{id}"),
            name: "家族 / family".into(),
            email: format!("family-{id}@example.jp"),
            consent,
            consent_date: consent.then(|| "2026-04-01".to_string()),
            relation: "家族".into(),
            language: if i % 9 == 0 && i > 0 { "en" } else { "ja" }.into(),
        }];
        driver.command_blocking(
            format!("demo-contacts-{id}"),
            Operator("demo".into()),
            Command::PutContacts {
                person_id: id.clone(),
                contacts,
                disclosure: Disclosure {
                    do_not_disclose,
                    share_shelter: i % 2 == 0,
                },
            },
        )?;
    }
    driver.shutdown()?;
    drop(lock);
    Ok(())
}

struct NodeSpec {
    id: &'static str,
    role: Role,
}

const NODES: [NodeSpec; 5] = [
    NodeSpec {
        id: "hq-1",
        role: Role::Hq,
    },
    NodeSpec {
        id: "shelter-01",
        role: Role::Shelter,
    },
    NodeSpec {
        id: "shelter-02",
        role: Role::Shelter,
    },
    NodeSpec {
        id: "clinic-1",
        role: Role::Clinic,
    },
    NodeSpec {
        id: "ambulance-1",
        role: Role::Ambulance,
    },
];

pub struct DemoArgs {
    pub dir: Option<PathBuf>,
    pub json: bool,
    pub base_port: u16,
    pub households: usize,
    pub seed: u64,
    /// `HOST:PORT` of an SMTP server to send the family mail to
    /// (plaintext, a local test relay), instead of the built-in one.
    pub smtp: Option<String>,
}

struct Planned {
    id: &'static str,
    role: Role,
    config: PathBuf,
    http: String,
    token: String,
    /// One-time sign-in link to the node's screen.
    signin: String,
}

pub fn run(args: DemoArgs) -> Result<(), Exit> {
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("kizuna-demo-{}", std::process::id())),
    };
    if dir.join("ca").exists() {
        return Err(Exit {
            code: 2,
            message: format!("{} already holds a demo; give another --dir", dir.display()),
        });
    }
    if args.base_port > 65535 - 200 {
        return Err(Exit {
            code: 2,
            message: format!(
                "--base-port {}: out of range (allowed 1024..=65335)",
                args.base_port
            ),
        });
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = dir.join("ca");
    certs::ca::init_ca(&ca, "Kizuna Demo CA").map_err(|e| anyhow!("{e}"))?;
    let hq_quic = format!("127.0.0.1:{}", args.base_port);
    let external_smtp = match &args.smtp {
        None => None,
        Some(hp) => {
            let (host, port) = hp
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                .filter(|(h, p)| !h.is_empty() && *p > 0)
                .ok_or_else(|| Exit::bad_input(format!("--smtp {hp}: expected HOST:PORT")))?;
            Some((host, port))
        }
    };
    let smtpd = match external_smtp {
        Some(_) => None,
        None => start_test_smtp(&dir),
    };
    let smtp_target = external_smtp
        .clone()
        .or_else(|| smtpd.as_ref().map(|s| ("127.0.0.1".to_string(), s.port)));
    let mut planned = Vec::new();
    for (i, n) in NODES.iter().enumerate() {
        let nd = dir.join(n.id);
        let node_id = NodeId::new(n.id).expect("valid id");
        // The ambulance keeps its data encrypted at rest (its default):
        // a storage key file beside its config, and its node key sealed
        // with it at issue.
        std::fs::create_dir_all(&nd)?;
        let storage_key = match n.role {
            Role::Ambulance => Some(
                certs::storagekey::generate_key_file(&nd.join("storage.key"))
                    .map_err(|e| anyhow!("{e}"))?,
            ),
            _ => None,
        };
        certs::ca::issue_sealed_at(
            &ca,
            n.role,
            &node_id,
            &nd.join("certs"),
            30,
            time::OffsetDateTime::now_utc(),
            storage_key.as_ref(),
        )
        .map_err(|e| anyhow!("{e}"))?;
        let quic = args.base_port + i as u16;
        let http = args.base_port + 100 + i as u16;
        let mut cfg = format!(
            "# kizuna demo node {id} ({role})\ndata_dir = \"data\"\n\n[certs]\ndir = \"certs\"\n\n[net]\nlisten = \"127.0.0.1:{quic}\"\nmdns = false\n",
            id = n.id,
            role = n.role
        );
        if n.role != Role::Hq {
            let _ = write!(
                cfg,
                "\n[[net.static_peers]]\nnode_id = \"hq-1\"\naddr = \"{hq_quic}\"\n"
            );
        }
        let _ = write!(cfg, "\n[http]\nbind = \"127.0.0.1:{http}\"\n");
        if storage_key.is_some() {
            let _ = write!(cfg, "\n[storage]\nkey_file = \"storage.key\"\n");
        }
        if let (Role::Hq, Some((host, port))) = (n.role, &smtp_target) {
            let _ = write!(
                cfg,
                "\n[smtp]\nhost = \"{host}\"\nport = {port}\nfrom = \"kizuna-hq@example.jp\"\ntls = \"none\"\n",
            );
        }
        let config = nd.join("kizuna.toml");
        std::fs::write(&config, cfg)?;
        let token = Operators::add(&nd.join("data"), "demo")?;
        let link = crate::auth::SigninLinks::issue(
            &nd.join("data"),
            "demo",
            Duration::from_secs(12 * 3600),
        )?;
        planned.push(Planned {
            id: n.id,
            role: n.role,
            config,
            http: format!("http://127.0.0.1:{http}"),
            signin: format!("http://127.0.0.1:{http}/ui/link/{link}"),
            token,
        });
    }
    // Registry and shelters at hq.
    let csv = dir.join("registry.csv");
    std::fs::write(&csv, synthetic_registry(args.households, args.seed))?;
    let hq_data = dir.join("hq-1").join("data");
    let summary =
        crate::import::import_file(&hq_data, &csv, crate::import::Encoding::Utf8, Some("hq-1"))?;
    eprintln!("{summary}");
    put_shelters(
        &hq_data,
        "hq-1",
        &[("shelter-01", "三条小学校"), ("shelter-02", "大島中学校")],
    )?;
    put_demo_profiles(&hq_data, "hq-1", 20)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mail_dir = smtpd.as_ref().map(|_| dir.join("mail"));
    if let Some((host, port)) = &external_smtp {
        eprintln!("family safety mail from hq goes to {host}:{port}");
    }
    let r = rt.block_on(supervise(planned, args.json, dir, mail_dir));
    drop(smtpd);
    r
}

/// The test SMTP server script, written into the demo directory.
const SMTP_TEST_SERVER: &str = include_str!("../../deploy/scripts/smtp-test-server.py");

struct TestSmtp {
    child: std::process::Child,
    port: u16,
}

impl Drop for TestSmtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts deploy/scripts/smtp-test-server.py in `accept` mode writing
/// into DIR/mail/, or says why not (python3-aiosmtpd missing) and returns
/// `None`: the demo then runs without mail.
fn start_test_smtp(dir: &std::path::Path) -> Option<TestSmtp> {
    use std::io::BufRead;
    let python = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let has_aiosmtpd = std::process::Command::new(python)
        .args(["-c", "import aiosmtpd"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_aiosmtpd {
        eprintln!("python3-aiosmtpd is not installed (deploy/scripts/setup.sh installs it): the demo runs without family mail");
        return None;
    }
    let script = dir.join("smtp-test-server.py");
    std::fs::write(&script, SMTP_TEST_SERVER).ok()?;
    let mut child = std::process::Command::new(python)
        .arg(&script)
        .args(["accept", "0", "--dir"])
        .arg(dir.join("mail"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let out = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let port = rx
        .recv_timeout(Duration::from_secs(20))
        .ok()
        .and_then(|l| l.trim().strip_prefix("ready ")?.parse().ok());
    match port {
        Some(port) => Some(TestSmtp { child, port }),
        None => {
            eprintln!("the test SMTP server did not start: the demo runs without family mail");
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

async fn supervise(
    planned: Vec<Planned>,
    json: bool,
    dir: PathBuf,
    mail_dir: Option<PathBuf>,
) -> Result<(), Exit> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for p in &planned {
        let log = std::fs::File::create(p.config.with_file_name("kizuna.log"))?;
        let child = tokio::process::Command::new(&exe)
            .arg("run")
            .arg("--config")
            .arg(&p.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", p.id))?;
        children.push(child);
    }
    let result = async {
        for (p, c) in planned.iter().zip(children.iter_mut()) {
            wait_ready(p, c).await?;
        }
        for p in &planned {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"node_id": p.id, "role": p.role, "url": p.http, "token": p.token, "signin_url": p.signin})
                );
            } else {
                println!("{:<10} {:<24} {}", p.role.as_str(), p.http, p.token);
                println!("{:<10} open the screen (one-time sign-in): {}", "", p.signin);
            }
        }
        eprintln!("demo running in {} (logs: <node>/kizuna.log); Ctrl-C stops it", dir.display());
        if let Some(m) = &mail_dir {
            eprintln!(
                "family safety mail from hq goes to a local test SMTP server; each mail lands in {}",
                m.display()
            );
        }
        tokio::select! {
            _ = crate::run::shutdown_signal() => Ok(()),
            r = wait_any_exit(&mut children) => r,
        }
    }
    .await;
    stop_all(&mut children).await;
    result
}

async fn wait_any_exit(children: &mut [tokio::process::Child]) -> Result<(), Exit> {
    loop {
        for c in children.iter_mut() {
            if let Some(st) = c.try_wait()? {
                return Err(Exit::from(anyhow!("a demo node exited early ({st})")));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn stop_all(children: &mut [tokio::process::Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            // No libc (unsafe is denied): the kill(1) utility sends SIGTERM.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    for c in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_err()
        {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

async fn wait_ready(p: &Planned, child: &mut tokio::process::Child) -> Result<(), Exit> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = p.http.trim_start_matches("http://").to_string();
    loop {
        if let Some(st) = child.try_wait()? {
            return Err(Exit::from(anyhow!(
                "{} exited during start-up ({st}); see {}",
                p.id,
                p.config.with_file_name("kizuna.log").display()
            )));
        }
        if status_ok(&addr, &p.token).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Exit::from(anyhow!(
                "{} did not answer /api/v1/status within 30 s",
                p.id
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn status_ok(addr: &str, token: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!(
        "GET /api/v1/status HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.1 200")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_registry_is_valid_and_seeded() {
        let a = synthetic_registry(300, 7);
        assert_eq!(a, synthetic_registry(300, 7));
        assert_ne!(a, synthetic_registry(300, 8));
        let lines: Vec<String> = a.lines().map(str::to_string).collect();
        let (h, n) = crate::import::parse_lines(&lines, 1_790_000_000_000).unwrap();
        assert_eq!(h.len(), 300);
        assert_eq!(n, lines.len() - 1);
        assert!(a.contains("昭和"));
    }
}
