//! Architecture invariant: the modules of `crdt` form layers, and a module
//! imports only modules of lower layers, so there is no import cycle (not
//! even one disguised as a second `impl Engine` in another file: that file
//! would have to import `engine`). Reads the sources: every `crate::x`
//! path outside comments counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first. A new module must be placed here.
const LAYERS: &[&[&str]] = &[
    &["text", "hlc", "mutants", "par"],
    &["ids"],
    &["actor", "model", "policy", "access"],
    &["doc", "jst"],
    &["signing"],
    &["views", "store", "mailtext", "testkit"],
    &["derive", "wire", "cache", "api"],
    &["share", "index", "content"],
    &["replica", "reconcile"],
    &["sessions", "commands", "mail"],
    &["queries"],
    &["engine"],
];

/// The modules a source file names through `crate::` paths (root
/// re-exports such as `crate::{Kind, NodeId}` are the `ids` module's).
pub fn crate_imports(text: &str, modules: &BTreeSet<&str>) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end]
                .split(',')
                .map(|item| item.trim().split("::").next().unwrap_or(""))
                .collect()
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            vec![&rest[..end]]
        };
        for n in names {
            if modules.contains(n) {
                out.insert(n.to_string());
            } else if n.starts_with(|c: char| c.is_ascii_uppercase()) {
                out.insert("ids".to_string());
            }
        }
    }
    out
}

#[test]
fn modules_import_only_lower_layers() {
    let layer: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.iter().map(move |m| (*m, i)))
        .collect();
    let modules: BTreeSet<&str> = layer.keys().copied().collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        assert!(
            path.extension().is_some_and(|e| e == "rs"),
            "{}: crdt/src has no subdirectories; place new modules in LAYERS",
            path.display()
        );
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        if name == "lib" {
            continue;
        }
        let Some(&mine) = layer.get(name.as_str()) else {
            panic!("module {name} is in no layer: add it to LAYERS in tests/core/layers.rs");
        };
        seen.insert(name.clone());
        let text = std::fs::read_to_string(&path).unwrap();
        for dep in crate_imports(&text, &modules) {
            if dep != name && layer[dep.as_str()] >= mine {
                wrong.push(format!(
                    "{name} (layer {mine}) imports {dep} (layer {})",
                    layer[dep.as_str()]
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
    let listed: BTreeSet<String> = modules.iter().map(|m| m.to_string()).collect();
    assert_eq!(seen, listed, "LAYERS lists modules that do not exist");
}

#[test]
fn the_scanner_sees_grouped_and_root_imports() {
    let modules: BTreeSet<&str> = ["ids", "engine", "store"].into();
    let text = "//! crate::engine in a doc comment\nuse crate::{store::Batch, Kind};\nfn f() { crate::engine::x(); }\n";
    let got = crate_imports(text, &modules);
    assert_eq!(
        got,
        ["engine", "ids", "store"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}
