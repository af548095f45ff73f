//! Replays every committed fuzz input on stable, in the normal test run:
//! the seeds under `fuzz/seeds/<target>/` and the crashers under
//! `fuzz/regressions/<target>/` (a crash found by `cargo fuzz`, minimised
//! and committed there, is a regression case from then on). The bodies
//! are the very functions the fuzz targets call (`fuzz/bodies.rs`).

#[path = "../../../fuzz/bodies.rs"]
mod bodies;

use std::path::PathBuf;

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn committed_fuzz_inputs_replay_cleanly() {
    let mut total = 0;
    for (target, body) in bodies::TARGETS {
        let seeds = inputs("seeds", target);
        assert!(!seeds.is_empty(), "fuzz/seeds/{target}/ has no seed inputs");
        for path in seeds.iter().chain(inputs("regressions", target).iter()) {
            let data = std::fs::read(path).unwrap();
            let r = std::panic::catch_unwind(|| body(&data));
            assert!(r.is_ok(), "{target}: {} panics", path.display());
            total += 1;
        }
    }
    eprintln!("replayed {total} committed fuzz inputs");
}

/// Every target listed in the bodies has a cargo-fuzz entry point.
#[test]
fn every_body_has_a_fuzz_target() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for (target, _) in bodies::TARGETS {
        let src = std::fs::read_to_string(dir.join(format!("{target}.rs")))
            .unwrap_or_else(|e| panic!("fuzz/fuzz_targets/{target}.rs: {e}"));
        assert!(src.contains(&format!("bodies::{target}(data)")), "{target}");
        assert!(src.contains("init: bodies::under_libfuzzer()"), "{target}");
    }
}

/// Under libFuzzer every panic reaches a hook that aborts the process.
/// `bodies::under_libfuzzer` keeps from that hook only the panics raised
/// inside Automerge, which the node's guard catches: replayed here with a
/// counting hook in place of libFuzzer's, the committed input that panics
/// inside Automerge never reaches it, and a panic of our own does.
#[test]
fn under_libfuzzer_only_automerge_panics_bypass_the_aborting_hook() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static ABORTS: AtomicUsize = AtomicUsize::new(0);
    std::panic::set_hook(Box::new(|info| {
        ABORTS.fetch_add(1, Ordering::SeqCst);
        eprintln!("{info}");
    }));
    bodies::under_libfuzzer();
    let cases = inputs("regressions", "automerge_doc");
    assert!(!cases.is_empty());
    for path in &cases {
        bodies::automerge_doc(&std::fs::read(path).unwrap());
    }
    assert_eq!(
        ABORTS.load(Ordering::SeqCst),
        0,
        "a panic inside Automerge that the guard catches reached the aborting hook"
    );
    let ours = std::panic::catch_unwind(|| panic!("a panic of our own"));
    assert!(ours.is_err());
    assert_eq!(ABORTS.load(Ordering::SeqCst), 1);
}
