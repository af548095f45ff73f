//! The tests' handle on `deploy/testbed`: every step that makes, faults,
//! kills or removes the mesh runs the `kizuna-testbed` command exactly as
//! an operator would (`--name`, `--dir`, then the subcommand); the handle
//! then reads the command's state file (`testbed.json`) to learn each
//! node's namespace, ports and token, and talks to the nodes' APIs from
//! inside their namespaces. Dropping the handle — also while unwinding
//! from a failed assertion — runs `down` (keeping the files of a failed
//! test for inspection and printing every node's log tail).
//!
//! Names: `tb<tag><pid>`, so no two test processes (nor the old `kz…`
//! namespaces of other checkouts) ever share a namespace. Needs root,
//! nftables, curl, and `kizuna` built beside `kizuna-testbed`
//! (`cargo build --release -p node --bin kizuna`).

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
pub use tests::testbed::{sample, wait_for, State};

pub fn testbed_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kizuna-testbed"))
}

pub fn kizuna_bin() -> PathBuf {
    tests::testbed::find_kizuna().expect("kizuna binary")
}

pub struct Testbed {
    pub name: String,
    pub dir: PathBuf,
    pub st: State,
    /// (household id, person id) of the registry, in file order.
    pub persons: Vec<(String, String)>,
    exports: usize,
    passed: bool,
    /// Extra environment for every command (the failure tests).
    env: Vec<(String, String)>,
}

/// Runs `kizuna-testbed --name NAME --dir DIR ARGS`.
pub fn testbed_cmd(
    name: &str,
    dir: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> Result<String> {
    let out = Command::new(testbed_bin())
        .args(["--name", name, "--dir"])
        .arg(dir)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .context("running kizuna-testbed")?;
    if !out.status.success() {
        bail!(
            "deploy/testbed {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn name_for(tag: &str) -> String {
    format!("tb{tag}{}", std::process::id() % 100_000)
}

pub fn dir_for(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kizuna-e2e-{name}"))
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let keep = !self.passed || std::env::var_os("KIZUNA_E2E_KEEP").is_some();
        if keep {
            for n in &self.st.nodes {
                eprintln!("--- {} log tail ---\n{}", n.id, self.st.log_tail(&n.id, 20));
            }
        }
        let args: &[&str] = if keep {
            &["down", "--keep-files"]
        } else {
            &["down"]
        };
        if let Err(e) = testbed_cmd(&self.name, &self.dir, args, &[]) {
            eprintln!("testbed cleanup: {e:#}");
        }
        if keep {
            eprintln!("testbed files kept at {}", self.dir.display());
        }
    }
}

impl Testbed {
    /// `deploy/testbed up ARGS` under a fresh name and directory.
    pub fn up(tag: &str, args: &[&str]) -> Result<Testbed> {
        let name = name_for(tag);
        let dir = dir_for(&name);
        // Leftovers of an earlier run of this very process id.
        let _ = testbed_cmd(&name, &dir, &["down"], &[]);
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = vec!["up"];
        a.extend_from_slice(args);
        testbed_cmd(&name, &dir, &a, &[])?;
        let st = State::load(&dir)?;
        let csv = std::fs::read_to_string(&st.registry_csv)?;
        let persons = csv
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[0].to_string(), f[2].to_string())
            })
            .collect();
        Ok(Testbed {
            name,
            dir,
            st,
            persons,
            exports: 0,
            passed: false,
            env: vec![],
        })
    }

    /// Ends a passing test: `down` removes the files too.
    pub fn passed(mut self) -> Result<()> {
        self.passed = true;
        Ok(())
    }

    /// Runs one testbed command and reloads the state.
    pub fn cmd(&mut self, args: &[&str]) -> Result<String> {
        let out = testbed_cmd(&self.name, &self.dir, args, &self.env)?;
        self.st = State::load(&self.dir)?;
        Ok(out)
    }

    pub fn start_all(&mut self) -> Result<()> {
        self.cmd(&["start"]).map(drop)
    }
    pub fn start(&mut self, id: &str) -> Result<()> {
        self.cmd(&["start", id]).map(drop)
    }
    pub fn stop(&mut self, id: &str) -> Result<()> {
        self.cmd(&["stop", id]).map(drop)
    }
    pub fn restart(&mut self, id: &str) -> Result<()> {
        self.cmd(&["restart", id]).map(drop)
    }

    pub fn node(&self, id: &str) -> &tests::testbed::NodeState {
        self.st.node(id).expect("node")
    }
    /// The storage key file of a node that encrypts at rest (ambulances).
    pub fn storage_key_file(&self, id: &str) -> Option<PathBuf> {
        let f = self.node(id).dir.join(tests::testbed::STORAGE_KEY_FILE);
        f.exists().then_some(f)
    }

    pub fn data_dir(&self, id: &str) -> PathBuf {
        self.node(id).data_dir()
    }
    pub fn db(&self, id: &str) -> PathBuf {
        self.data_dir(id).join("kizuna.db")
    }

    pub fn api(
        &self,
        id: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        self.st.api(id, method, path, body)
    }

    pub fn status(&self, id: &str) -> Result<Value> {
        self.st.status_of(id)
    }

    pub fn metrics(&self, id: &str) -> Result<String> {
        self.st.scrape(id)
    }

    /// Node ids of the peers `/api/v1/status` shows connected.
    pub fn connected(&self, id: &str) -> Result<BTreeSet<String>> {
        let s = self.status(id)?;
        Ok(s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["connected"] == json!(true))
            .filter_map(|p| p["node_id"].as_str().map(str::to_string))
            .collect())
    }

    /// `GET /api/v1/persons/{id}`: `None` on 404.
    pub fn person(&self, node: &str, person: &str) -> Result<Option<Value>> {
        match self.api(node, "GET", &format!("/api/v1/persons/{person}"), None)? {
            (200, v) => Ok(Some(v)),
            (404, _) => Ok(None),
            (c, v) => bail!("{node} person {person}: {c} {v}"),
        }
    }

    /// Check-in at a shelter node (its own shelter); `op` is the
    /// idempotency key.
    pub fn checkin(&self, node: &str, persons: &[&str], op: &str) -> Result<(u16, Value)> {
        self.api(
            node,
            "POST",
            "/api/v1/checkins",
            Some(&json!({"person_ids": persons, "op_id": op})),
        )
    }

    /// `kizuna docs export` of a stopped node's database (the export is
    /// audited, so it needs the data directory to itself). Returns the
    /// export directory.
    pub fn export(&mut self, id: &str) -> Result<PathBuf> {
        self.exports += 1;
        let out = self.dir.join(format!("export-{id}-{}", self.exports));
        let mut cmd = Command::new(kizuna_bin());
        cmd.args(["docs", "export", "--data-dir"])
            .arg(self.data_dir(id))
            .arg("--out")
            .arg(&out);
        if let Some(key) = self.storage_key_file(id) {
            cmd.arg("--storage-key-file").arg(key);
        }
        tests::testbed::run_ok(&mut cmd)?;
        Ok(out)
    }

    /// Every document of `kind` in a node's database, as plain Automerge
    /// bytes, read through a read-only SQLite connection beside the live
    /// node (WAL readers never block the writer; `docs export` needs the
    /// node stopped).
    pub fn live_docs(&self, id: &str, kind: crdt::Kind) -> Result<Vec<Vec<u8>>> {
        use crdt::store::Store;
        let key = match self.storage_key_file(id) {
            Some(f) => Some(std::sync::Arc::new(certs::storagekey::read(
                &certs::storagekey::KeySource::File(f),
            )?)),
            None => None,
        };
        let store = node::store::SqliteStore::open_with(
            &self.data_dir(id).join(node::store::DB_FILE_NAME),
            &node::store::OpenOptions {
                read_only: true,
                key,
                ..Default::default()
            },
        )?;
        let mut docs = Vec::new();
        for (key, _) in store.doc_index()? {
            if key.kind != kind {
                continue;
            }
            // Written between listing and loading is fine: it is newer.
            let Some(sd) = store.load_doc(&key)? else {
                continue;
            };
            let doc = crdt::doc::Doc::load(key.clone(), sd.snapshot.as_deref(), &sd.changes)
                .map_err(|e| anyhow::anyhow!("{}/{}: {e}", key.kind.as_str(), key.id))?;
            let bytes = doc
                .save()
                .map_err(|e| anyhow::anyhow!("{}/{}: {e}", key.kind.as_str(), key.id))?;
            docs.push(bytes);
        }
        Ok(docs)
    }

    /// Document ids per kind in a node's export.
    pub fn kinds(&mut self, id: &str) -> Result<BTreeMap<String, BTreeSet<String>>> {
        let out = self.export(id)?;
        let index: Value = serde_json::from_slice(&std::fs::read(out.join("index.json"))?)?;
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for d in index["documents"].as_array().into_iter().flatten() {
            m.entry(d["kind"].as_str().unwrap_or("").to_string())
                .or_default()
                .insert(d["id"].as_str().unwrap_or("").to_string());
        }
        Ok(m)
    }

    /// The presence event ids a running node holds for `persons`, from
    /// each person's history (`GET /api/v1/persons/{id}/history`).
    pub fn event_ids(&self, node: &str, persons: &[String]) -> Result<BTreeSet<String>> {
        let mut ids = BTreeSet::new();
        for p in persons {
            let path = format!("/api/v1/persons/{p}/history");
            match self.api(node, "GET", &path, None)? {
                (200, v) => ids.extend(
                    v["events"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|e| e["event_id"].as_str().map(str::to_string)),
                ),
                (c, v) => bail!("{node} history of {p}: {c} {v}"),
            }
        }
        Ok(ids)
    }

    /// Every presence event id a node's database holds (running or not):
    /// the `ev:<id>` keys of its presence documents, read with plain
    /// Automerge through a read-only connection ([`Testbed::live_docs`]).
    pub fn stored_event_ids(&self, id: &str) -> Result<BTreeSet<String>> {
        use automerge::ReadDoc;
        let mut ids = BTreeSet::new();
        for bytes in self.live_docs(id, crdt::Kind::Presence)? {
            let doc = automerge::Automerge::load(&bytes)?;
            for k in doc.keys(automerge::ROOT) {
                if let Some(ev) = k.strip_prefix("ev:") {
                    ids.insert(ev.to_string());
                }
            }
        }
        Ok(ids)
    }
}

pub const SYNC: Duration = Duration::from_secs(120);

/// Waits until `node` holds the registry entry of `person`.
pub fn wait_person(tb: &Testbed, node: &str, person: &str) -> Result<Value> {
    wait_for(&format!("{person} at {node}"), SYNC, || {
        Ok(tb.person(node, person)?.ok_or_else(|| "404".to_string()))
    })
}

/// Waits until `node` shows `person` checked in at `shelter`.
pub fn wait_location(tb: &Testbed, node: &str, person: &str, shelter: &str) -> Result<Value> {
    wait_for(&format!("{person} in {shelter} at {node}"), SYNC, || {
        let p = tb.person(node, person)?;
        match &p {
            Some(v) if v["location"]["shelter_id"] == json!(shelter) => Ok(Ok(v.clone())),
            other => Ok(Err(format!("{other:?}"))),
        }
    })
}

pub fn wait_connected(tb: &Testbed, node: &str, want: &[&str]) -> Result<()> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(&format!("{node} connected to {want:?}"), SYNC, || {
        let c = tb.connected(node)?;
        Ok(if want.is_subset(&c) {
            Ok(())
        } else {
            Err(format!("connected: {c:?}"))
        })
    })
}

pub fn checkin_ok(tb: &Testbed, node: &str, persons: &[&str], op: &str) -> Result<Vec<String>> {
    let (code, body) = tb.checkin(node, persons, op)?;
    ensure!(code == 201, "check-in at {node}: {code} {body}");
    Ok(body["event_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect())
}

/// Waits until every node holds the whole registry (hq's count).
pub fn wait_registry(tb: &Testbed, nodes: &[&str]) -> Result<u64> {
    let want = tb.status("hq-1")?["documents_by_kind"]["registry"]
        .as_u64()
        .context("hq registry count")?;
    ensure!(
        want as usize == tb.st.households,
        "hq holds {want} households"
    );
    for n in nodes {
        wait_for(&format!("the registry at {n}"), SYNC, || {
            let got = tb.status(n)?["documents_by_kind"]["registry"].as_u64();
            Ok(if got == Some(want) {
                Ok(())
            } else {
                Err(format!("{got:?} of {want}"))
            })
        })?;
    }
    Ok(want)
}
