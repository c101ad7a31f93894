//! The architecture, checked (docs/ARCHITECTURE.md): the core imports no shell; the data plane
//! (`proxy`) and the control plane (`cluster`) import neither each other nor `ops::admin`;
//! `app::probe` imports neither; `ops::admin` consumes seams it owns; only `app` (and the
//! command line above it) wires shells together. Inside `proxy/`, imports run one way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The code of a file before its `#[cfg(test)]` module, without comments.
fn code(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Folders whose files are layers of their own (`ops::admin`, `net::tls`, `app::probe`).
const SPLIT: [&str; 4] = ["ops", "net", "cli", "app"];

/// The crate's modules a file names: `crate::NAME`, or `crate::NAME::SUB` under a split folder.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    code.match_indices("crate::")
        .map(|(i, m)| {
            let rest = &code[i + m.len()..];
            let first = ident(rest);
            let after = &rest[first.len()..];
            match after.strip_prefix("::") {
                Some(sub) if SPLIT.contains(&first.as_str()) => {
                    let second = ident(sub);
                    if second.starts_with(|c: char| c.is_ascii_lowercase()) {
                        format!("{first}::{second}")
                    } else {
                        first
                    }
                }
                _ => first,
            }
        })
        .collect()
}

/// The module a source file belongs to (`src/proxy/forward.rs` -> `proxy`,
/// `src/ops/admin.rs` -> `ops::admin`, `src/app/probe.rs` -> `app::probe`).
fn module_of(src: &Path, p: &Path) -> String {
    let rel = p.strip_prefix(src).unwrap();
    let parts: Vec<String> = rel
        .components()
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string()
        })
        .collect();
    let first = parts[0].clone();
    match parts.get(1) {
        Some(second) if first != "app" && SPLIT.contains(&first.as_str()) && second != "mod" => {
            format!("{first}::{second}")
        }
        Some(second) if first == "app" && second == "probe" => "app::probe".into(),
        _ => first,
    }
}

/// Whether `r` is `bad` or inside it (`net::tls` is inside `net`).
fn within(r: &str, bad: &str) -> bool {
    r == bad || r.starts_with(&format!("{bad}::"))
}

#[test]
fn shells_meet_only_in_app() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let io_leaf: &[&str] = &[
        "proxy",
        "cluster",
        "ops::admin",
        "app",
        "config",
        "sim",
        "cli",
    ];
    // module -> modules it must not name.
    let forbidden: BTreeMap<&str, &[&str]> = BTreeMap::from([
        (
            "core",
            &[
                "proxy", "cluster", "ops", "app", "net", "config", "sim", "cli", "dns",
            ][..],
        ),
        ("proxy", &["cluster", "ops::admin", "app", "sim", "cli"][..]),
        ("cluster", &["proxy", "ops::admin", "app", "sim", "cli"][..]),
        ("app::probe", io_leaf),
        ("ops::admin", io_leaf),
        ("net", io_leaf),
        ("net::tls", io_leaf),
        ("net::uring", io_leaf),
        ("dns", io_leaf),
        (
            "sim",
            &["proxy", "cluster", "ops", "app", "net", "cli", "dns"][..],
        ),
    ]);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for p in sources(&src) {
        let m = module_of(&src, &p);
        let refs = crate_refs(&code(&p));
        if let Some(bad) = forbidden.get(m.as_str()) {
            for r in &refs {
                if bad.iter().any(|b| within(r, b)) {
                    problems.push(format!("{} imports {r}", p.display()));
                }
            }
        }
        graph
            .entry(m.clone())
            .or_default()
            .extend(refs.into_iter().filter(|r| *r != m));
    }
    println!("import graph (module -> modules it names):");
    for (m, refs) in &graph {
        println!(
            "  {m} -> {}",
            refs.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn no_import_cycles_inside_the_data_plane() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/proxy");
    // file -> sibling files it names through `super::` or `crate::proxy::`.
    let name = |p: &Path| {
        let rel = p.strip_prefix(&dir).unwrap().to_string_lossy().to_string();
        rel.trim_end_matches(".rs")
            .trim_end_matches("/mod")
            .to_string()
    };
    let files = sources(&dir);
    let top: BTreeSet<String> = files
        .iter()
        .map(|p| name(p).split('/').next().unwrap().to_string())
        .filter(|n| n != "mod")
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &files {
        let from = name(p).split('/').next().unwrap().to_string();
        if from == "mod" {
            continue; // the parent only declares its children
        }
        let code = code(p);
        for t in &top {
            let named = code.contains(&format!("super::{t}::"))
                || code.contains(&format!("super::{t};"))
                || code.contains(&format!("super::{{{t}"))
                || code.contains(&format!("crate::proxy::{t}"));
            if named && *t != from {
                edges.entry(from.clone()).or_default().insert(t.clone());
            }
        }
    }
    println!("proxy/ imports:");
    for (f, to) in &edges {
        println!(
            "  {f} -> {}",
            to.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    // Depth-first search for a back edge.
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for f in &top {
        if let Some(cycle) = visit(f, &edges, &mut Vec::new(), &mut done) {
            panic!("import cycle in src/proxy: {}", cycle.join(" -> "));
        }
    }
}
