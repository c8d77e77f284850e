//! The node's modules form layers: a module uses only modules of lower layers (and the
//! crate root's `Error`, `io`, `shard_of` and `Node` items), never one of its own layer or
//! above, so the graph has no circle. ARCHITECTURE.md draws the same layers.

use std::collections::BTreeSet;
use std::path::Path;

/// Lowest first.
const LAYERS: &[&[&str]] = &[
    // The counting allocator (metrics read its count).
    &["alloc"],
    // Where things are on disk, the configuration, atomic files, metrics.
    &["layout", "config", "files", "metrics"],
    &["snapshots", "tls"],
    // The embedded controller (its own files under controller/).
    &["controller"],
    // What every shard shares.
    &["common"],
    // Framing on a stream; the leader's replication state of a log.
    &["wire", "replication"],
    // A shard's logs and their roles.
    &["shard"],
    // Drivers: the leader's streams, the scrub, the requests, the follower role, connections.
    &["leader", "scrub"],
    &["service"],
    &["follow"],
    &["conn"],
    // A shard's thread, which starts the drivers.
    &["runtime"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The crate's modules a source file names (`crate::m`, `crate::{m, ...}`), outside comments.
fn uses(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end]
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or(""))
                    .collect()
            } else {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                vec![&rest[..end]]
            };
            for n in names {
                // Modules are lower case; the root's types (`Error`, `Node`...) are not.
                if n.starts_with(|c: char| c.is_ascii_lowercase()) {
                    out.insert(n.to_string());
                }
            }
        }
    }
    out
}

/// Functions the crate root (lib.rs) defines, which every module may call.
const ROOT_ITEMS: &[&str] = &["io", "shard_of"];

#[test]
fn every_module_uses_only_modules_of_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            for inner in std::fs::read_dir(&path).unwrap() {
                files.push(inner.unwrap().path());
            }
        } else {
            files.push(path);
        }
    }
    let mut wrong = Vec::new();
    let mut seen = BTreeSet::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" || rel.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let Some(layer) = layer_of(&module) else {
            wrong.push(format!("{}: module {module} is in no layer", rel.display()));
            continue;
        };
        seen.insert(module.clone());
        let source = std::fs::read_to_string(&file).unwrap();
        for used in uses(&source) {
            if used == module || ROOT_ITEMS.contains(&used.as_str()) {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < layer => {}
                Some(l) => wrong.push(format!(
                    "{}: {module} (layer {layer}) uses {used} (layer {l})",
                    rel.display()
                )),
                None => wrong.push(format!(
                    "{}: uses crate::{used}, which is in no layer",
                    rel.display()
                )),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Every layered module exists: the list stays current.
    for m in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(seen.contains(*m), "no module {m} any more");
    }
}

#[test]
fn the_check_sees_grouped_and_path_uses_but_not_comments() {
    let found = uses(
        "use crate::{shard::Shard, wire};\nlet x = crate::leader::f();\n// crate::conn\nuse crate::Error;",
    );
    let want: BTreeSet<String> = ["shard", "wire", "leader"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, want);
}
