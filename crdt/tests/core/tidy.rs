//! Architecture invariant: the core stays sans-IO. Its normal dependency
//! tree holds none of the driver crates.

#[test]
fn core_depends_on_no_io_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            "crdt",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
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
