//! The layout is the architecture (docs/architecture.md), and this keeps it so. It reads the
//! sources of `driver/src` and `provisioner/src` and checks:
//!
//! - the import graph between top-level modules (a folder, or a file directly under `src/`) is
//!   acyclic, in both crates, and the driver's modules sit in the documented layers: a module
//!   imports only modules of lower layers (or of its own layer, where no cycle forms);
//! - no source file is longer than [`MAX_LINES`];
//! - loop-device knowledge (loop ioctls, loop sysfs, the `loopdev` crate) appears only inside
//!   the loop data path, `driver/src/datapath/loop_device/`.
//!
//! `LOOPVOL_ARCH_ROOT` points the checks at another checkout (to see them fail on a tree that
//! breaks the rules).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;

/// The driver's layers, top first. A module may import modules of any later layer.
const DRIVER_LAYERS: &[&[&str]] = &[
    &["server"],
    &["cli"],
    &["ops", "multinode"],
    &["edge"],
    &["state"],
    &["engine"],
    &["fs"],
    &["datapath", "node_state"],
    &["shared"],
    &["csi", "error", "transfer_api"],
    &["metrics"],
];

/// Where loop ioctls and loop sysfs may be named.
const LOOP_MODULE: &str = "driver/src/datapath/loop_device/";

fn root() -> PathBuf {
    match std::env::var_os("LOOPVOL_ARCH_ROOT") {
        Some(r) => PathBuf::from(r),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The source without `//` comments (doc comments included), so prose may name anything.
/// String literals are kept: a path in a string is code.
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let bytes = line.as_bytes();
        let (mut in_str, mut i, mut cut) = (false, 0, line.len());
        while i + 1 < bytes.len() {
            match bytes[i] {
                b'\\' if in_str => i += 1,
                b'"' => in_str = !in_str,
                b'/' if !in_str && bytes[i + 1] == b'/' => {
                    cut = i;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first path segments after every `crate::` in `code`, including each entry of a
/// `crate::{a, b::c}` group.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        // `loopvol_crate::` or `some_crate::` are other paths.
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            let mut depth = 0;
            let mut start = 0;
            let inner = &group[..end];
            for (i, c) in inner
                .char_indices()
                .chain(std::iter::once((inner.len(), ',')))
            {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let name = ident_at(inner[start..i].trim());
                        if !name.is_empty() {
                            out.insert(name.to_string());
                        }
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident_at(rest);
            if !name.is_empty() {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// `pub use module::{A, B}` / `pub use module::A` in the crate root: names the root re-exports,
/// mapped to the module that defines them.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in strip_comments(lib).lines() {
        let Some(rest) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let rest = rest.trim_end_matches(';');
        let module = ident_at(rest).to_string();
        let names = rest[module.len()..].trim_start_matches("::");
        let names = names.trim_start_matches('{').trim_end_matches('}');
        for n in names.split(',') {
            let n = n.trim();
            let n = n.rsplit("::").next().unwrap_or(n);
            let n = n.split(" as ").last().unwrap_or(n).trim();
            if !n.is_empty() {
                out.insert(n.to_string(), module.clone());
            }
        }
    }
    out
}

/// The top-level module a file of `src` belongs to (`None` for the crate root and the binary).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The module graph of one crate: top-level module → the top-level modules it names.
fn module_graph(crate_dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let src = crate_dir.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let reexports = root_reexports(&lib);
    let mut modules = BTreeSet::new();
    for f in &files {
        if let Some(m) = top_module(&src, f) {
            modules.insert(m);
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(from) = top_module(&src, f) else {
            continue;
        };
        let code = strip_comments(&std::fs::read_to_string(f).unwrap());
        let deps = graph.entry(from.clone()).or_default();
        for name in crate_refs(&code) {
            let to = reexports.get(&name).cloned().unwrap_or(name);
            // Items of the crate root itself (a const, a macro) are no module.
            if to != from && modules.contains(&to) {
                deps.insert(to);
            }
        }
    }
    graph
}

/// Every cycle's members (Tarjan's strongly connected components of more than one module).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let l = t.low[v].min(t.low[w]);
                t.low.insert(v, l);
            } else if t.on.contains(w) {
                let l = t.low[v].min(t.index[w]);
                t.low.insert(v, l);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn the_parser_sees_imports() {
    let refs = crate_refs(&strip_comments(
        "use crate::{engine::{self, Engine}, fs::mount};\n// crate::ignored\nlet x = crate::error::Error::Io; let u = \"unix://x\"; crate::shared::f();\nmy_crate::nothing();",
    ));
    let want: BTreeSet<String> = ["engine", "fs", "error", "shared"].map(String::from).into();
    assert_eq!(refs, want);
    let g = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
        ("d".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
}

#[test]
fn no_import_cycle_between_modules() {
    for krate in ["driver", "provisioner"] {
        let graph = module_graph(&root().join(krate));
        assert!(
            graph.len() >= 8,
            "{krate}: only {} modules found; is the root right?",
            graph.len()
        );
        let found = cycles(&graph);
        assert!(
            found.is_empty(),
            "{krate}: modules that import each other in a circle: {found:?}\ngraph: {graph:#?}"
        );
    }
}

#[test]
fn driver_modules_import_only_lower_layers() {
    let graph = module_graph(&root().join("driver"));
    let layer = |m: &str| DRIVER_LAYERS.iter().position(|l| l.contains(&m));
    let mut wrong = Vec::new();
    for (from, deps) in &graph {
        let Some(lf) = layer(from) else {
            wrong.push(format!("{from} is in no layer of DRIVER_LAYERS"));
            continue;
        };
        for to in deps {
            match layer(to) {
                Some(lt) if lt >= lf => {}
                Some(_) => wrong.push(format!("{from} imports {to}, a higher layer")),
                None => wrong.push(format!("{to} (imported by {from}) is in no layer")),
            }
        }
    }
    // The seams the layout exists for.
    for (from, to) in [("engine", "datapath"), ("engine", "fs"), ("edge", "engine")] {
        if !graph.get(from).is_some_and(|d| d.contains(to)) {
            wrong.push(format!(
                "{from} should reach {to}, and the graph says it does not"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_source_file_is_too_long() {
    let mut long = Vec::new();
    for krate in ["driver", "provisioner"] {
        let mut files = Vec::new();
        rust_files(&root().join(krate).join("src"), &mut files);
        for f in files {
            let n = std::fs::read_to_string(&f).unwrap().lines().count();
            if n > MAX_LINES {
                long.push(format!("{} has {n} lines", f.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines (split by responsibility):\n{}",
        long.join("\n")
    );
}

/// Whether `code` names loop-device internals: a loop ioctl or its number (magic 'L' = 0x4C),
/// `struct loop_info64`, the loop control device, a loop sysfs attribute, or the loopdev crate.
fn loop_knowledge(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    for needle in [
        "LOOP_",
        "LO_FLAGS_",
        "loop_info64",
        "LoopInfo64",
        "/dev/loop-control",
        "loop/backing_file",
        "loop/dio",
        "loop/autoclear",
        "loopdev",
    ] {
        for (at, _) in code.match_indices(needle) {
            let before = code[..at].chars().next_back();
            if needle == "LOOP_" && before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let line = code[..at].lines().count().max(1);
            found.push(format!("line {line}: {needle}"));
        }
    }
    for (at, _) in code.match_indices("0x4C").chain(code.match_indices("0x4c")) {
        if code[at + 4..]
            .chars()
            .take(2)
            .all(|c| c.is_ascii_hexdigit())
        {
            found.push(format!(
                "line {}: loop ioctl number",
                code[..at].lines().count()
            ));
        }
    }
    found
}

#[test]
fn only_the_loop_data_path_knows_loop_devices() {
    let root = root();
    let mut leaks = Vec::new();
    let mut inside = 0;
    for krate in ["driver", "provisioner"] {
        let mut files = Vec::new();
        rust_files(&root.join(krate).join("src"), &mut files);
        files.push(root.join(krate).join("Cargo.toml"));
        for f in files {
            let rel = f
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let code = strip_comments(&std::fs::read_to_string(&f).unwrap());
            let found = loop_knowledge(&code);
            if rel.starts_with(LOOP_MODULE) {
                inside += found.len();
            } else {
                leaks.extend(found.into_iter().map(|w| format!("{rel} {w}")));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "loop-device internals outside {LOOP_MODULE}:\n{}",
        leaks.join("\n")
    );
    // The check must see the real thing where it does belong.
    assert!(
        inside >= 5,
        "{LOOP_MODULE} names loop ioctls only {inside} times"
    );
}
