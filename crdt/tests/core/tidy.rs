//! Tidy checks over the workspace's files. Architecture invariant: the
//! core stays sans-IO (its normal dependency tree holds none of the driver
//! crates, its sources read no clock). And every fault id the sources cite
//! (A-1 …, I-34 of the design brief) is defined in `docs/faults.md`, whose
//! file paths all exist, so the page cannot silently rot as code moves.
//! The node's build leaves out the simulator's sharing and the test kit,
//! and the node crate keeps one integration test binary.

/// `cargo ARGS --offline` in this crate's directory: its standard output.
fn cargo(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(args)
        .arg("--offline")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn core_depends_on_no_io_crates() {
    let tree = cargo(&["tree", "-p", "crdt", "-e", "normal", "--prefix", "none"]);
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(crates.contains(&"automerge"), "tree looks wrong: {tree}");
    for banned in [
        "tokio", "quinn", "rusqlite", "mdns-sd", "pcsc", "axum", "lettre", "rustls", "hyper", "mio",
    ] {
        assert!(!crates.contains(&banned), "crdt depends on {banned}");
    }
}

/// The core reads no clock and no OS entropy itself.
#[test]
fn core_source_reads_no_clock() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for banned in [
            "SystemTime",
            "Instant::now",
            "thread_rng",
            "OsRng",
            "std::fs",
            "std::net",
            "getrandom",
        ] {
            assert!(!text.contains(banned), "{} uses {banned}", path.display());
        }
    }
}

/// The fault and bad-input ids of the design brief, per letter: A-1..A-14
/// and so on, I-1..I-34 for bad inputs. `docs/faults.md` defines each in
/// one table row.
const BRIEF_IDS: &[(char, u32)] = &[
    ('A', 14),
    ('B', 4),
    ('C', 12),
    ('D', 7),
    ('E', 13),
    ('F', 5),
    ('G', 7),
    ('H', 3),
    ('I', 34),
];

/// Fault ids in `text`: a letter A to I, a hyphen and one or two digits,
/// not glued to a word before or after (so "UTF-8" or "SHA-1" do not count).
fn fault_ids(text: &str) -> std::collections::BTreeSet<String> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = std::collections::BTreeSet::new();
    for i in 0..b.len() {
        if !(b'A'..=b'I').contains(&b[i]) || b.get(i + 1) != Some(&b'-') {
            continue;
        }
        if i > 0 && (word(b[i - 1]) || b[i - 1] == b'-') {
            continue;
        }
        let digits = b[i + 2..].iter().take_while(|c| c.is_ascii_digit()).count();
        let end = i + 2 + digits;
        if (1..=2).contains(&digits) && !b.get(end).is_some_and(|&c| word(c)) {
            out.insert(text[i..end].to_string());
        }
    }
    out
}

/// Source, manifest and script files under `dir`, skipping build output,
/// hidden directories and `docs/` (which explains the ids, not cites them).
fn cited_files(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if name == "target" || name.starts_with('.') || path == root.join("docs") {
                continue;
            }
            cited_files(root, &path, out);
        } else if ["rs", "toml", "sh", "py"]
            .iter()
            .any(|e| path.extension().is_some_and(|x| x == *e))
        {
            out.push(path);
        }
    }
}

/// Architecture invariant: every fault id cited anywhere in the workspace
/// is defined in `docs/faults.md` (one table row per id, exactly the
/// brief's ids), and every file path that page names exists.
#[test]
fn fault_ids_are_defined() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let doc = std::fs::read_to_string(root.join("docs/faults.md")).expect("docs/faults.md");
    // Rows: "| A-1 | ...".
    let mut defined = std::collections::BTreeSet::new();
    for line in doc.lines() {
        let Some(rest) = line.strip_prefix("| ") else {
            continue;
        };
        let id = rest.split(' ').next().unwrap_or("");
        if fault_ids(id).len() == 1 && fault_ids(id).contains(id) {
            assert!(
                defined.insert(id.to_string()),
                "{id} has two rows in docs/faults.md"
            );
        }
    }
    let brief: std::collections::BTreeSet<String> = BRIEF_IDS
        .iter()
        .flat_map(|&(l, n)| (1..=n).map(move |i| format!("{l}-{i}")))
        .collect();
    let missing: Vec<_> = brief.difference(&defined).collect();
    let extra: Vec<_> = defined.difference(&brief).collect();
    assert!(
        missing.is_empty(),
        "docs/faults.md has no row for {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "docs/faults.md has rows for ids not in the brief: {extra:?}"
    );

    let mut files = Vec::new();
    cited_files(&root, &root, &mut files);
    assert!(
        files.len() > 50,
        "found only {} files under {}",
        files.len(),
        root.display()
    );
    let mut undefined = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for id in fault_ids(&text) {
            if !defined.contains(&id) {
                undefined.push(format!(
                    "{id} in {}",
                    f.strip_prefix(&root).unwrap().display()
                ));
            }
        }
    }
    assert!(
        undefined.is_empty(),
        "fault ids cited but not defined in docs/faults.md: {undefined:?}"
    );

    // Code spans that look like relative paths (a directory ending in `/`,
    // or a file name with an extension) must name existing files.
    let path_char = |c: char| c.is_ascii_alphanumeric() || "_.-/".contains(c);
    let is_path = |s: &str| {
        s.contains('/')
            && !s.starts_with('/')
            && s.chars().all(path_char)
            && (s.ends_with('/') || s.rsplit('/').next().is_some_and(|f| f.contains('.')))
    };
    let mut dangling = Vec::new();
    for (i, span) in doc.split('`').enumerate() {
        if i % 2 == 1 && is_path(span) {
            if !root.join(span).exists() {
                dangling.push(span.to_string());
            }
        }
    }
    assert!(
        dangling.is_empty(),
        "docs/faults.md names paths that do not exist: {dangling:?}"
    );
}

/// Document sharing between engines (`crdt::share`) is the simulator's
/// memory trick and the test kit is for tests: the node binary's normal
/// dependency tree enables neither.
#[test]
fn node_builds_without_document_sharing_or_test_kit() {
    let features = |pkg: &str| {
        cargo(&[
            "tree",
            "-p",
            pkg,
            "-e",
            "features,normal",
            "--prefix",
            "none",
        ])
    };
    let share = "crdt feature \"share\"";
    assert!(features("sim").contains(share), "the tree output changed");
    let node = features("node");
    assert!(!node.contains(share), "node enables crdt's share feature");
    assert!(
        !node.contains("crdt feature \"testkit\""),
        "node's build enables crdt's testkit feature"
    );
}

/// Architecture invariant: the node crate has one integration test binary,
/// `node/tests/it/` (each tier a module of it, `support` compiled once; see
/// its `main.rs`). Cargo makes a second one of any `node/tests/*.rs`, any
/// other `node/tests/<dir>/main.rs` or a `[[test]]` in `node/Cargo.toml`:
/// cargo's own list of the package's targets says which there are.
#[test]
fn node_has_one_integration_test_binary() {
    let out = cargo(&["metadata", "--no-deps", "--format-version", "1"]);
    let meta: serde_json::Value = serde_json::from_str(&out).unwrap();
    let node = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "node")
        .expect("the node package");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let tests: Vec<String> = node["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "test"))
        .map(|t| {
            let src = std::path::Path::new(t["src_path"].as_str().unwrap());
            src.strip_prefix(root).unwrap_or(src).display().to_string()
        })
        .collect();
    assert_eq!(
        tests,
        ["node/tests/it/main.rs"],
        "node has integration test binaries besides node/tests/it/: make each a \
         module of node/tests/it/ (listed in its main.rs) instead"
    );
}
