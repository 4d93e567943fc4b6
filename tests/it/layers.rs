//! The floors of `src/` (issue 24): every `crate::` path in a top-level module points to a
//! module on a lower floor, or on its own floor without closing a cycle, as the module map in
//! docs/architecture.md declares; the map names exactly the modules `src/lib.rs` declares.
//!
//! The check reads source text (no `syn`): comments, string and char literals are blanked,
//! then every `crate::name` and every name in a `crate::{a, b::c}` group is an edge. The
//! Python world's import-linter is the model: declared layers, checked in CI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `from -> {to -> the files that make the edge}`.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `(floor, module)` rows of the module map: rows `| <floor> | `name`, `name` | ... |`.
fn declared_floors(architecture: &str) -> BTreeMap<String, u32> {
    let mut floors = BTreeMap::new();
    let map = architecture
        .split("\n## Module map")
        .nth(1)
        .expect("docs/architecture.md has a `## Module map` section");
    let map = map.split("\n## ").next().unwrap_or(map);
    for line in map.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, floor, modules, ..] = cells.as_slice() else {
            continue;
        };
        let Ok(floor) = floor.parse::<u32>() else {
            continue;
        };
        for name in modules.split(',') {
            let name = name.trim().trim_matches('`');
            assert!(
                floors.insert(name.to_string(), floor).is_none(),
                "module map names `{name}` twice"
            );
        }
    }
    floors
}

/// The top-level modules `src/lib.rs` declares.
fn lib_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .chain(lib.lines().filter_map(|l| l.trim().strip_prefix("mod ")))
        .map(|rest| rest.trim_end_matches(';').trim().to_string())
        .collect()
}

/// `text` with comments, string literals (raw ones too) and char literals replaced by spaces,
/// so a path in a doc comment or a message is no edge. Lifetimes (`'a`) are kept.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        out.extend(
            b[from..to]
                .iter()
                .map(|c| if *c == b'\n' { b'\n' } else { b' ' }),
        );
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|c| *c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            // Block comments nest in Rust.
            let (mut depth, mut j) = (0usize, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if let Some(hashes) = raw_string_start(b, i) {
            // r"..", r#".."#, br#".."#: ends at `"` followed by as many `#`.
            let open = b[i..].iter().position(|c| *c == b'"').unwrap() + i + 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let end = b[open..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| open + p + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}', '"') closes within a few bytes; a
            // lifetime or label does not.
            let close = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|c| *c == b'\'')
                    .map(|p| i + 2 + p)
            } else {
                let ch = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch) == Some(&b'\'')).then_some(i + 1 + ch)
            };
            match close {
                Some(end) => {
                    blank(&mut out, i, end + 1);
                    i = end + 1;
                }
                None => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII bytes were replaced")
}

/// At a raw string literal (`r"`, `r#`, `br"`, `br#` not inside an identifier): its `#` count.
fn raw_string_start(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
        return None;
    }
    let j = match b[i..] {
        [b'r', ..] => i + 1,
        [b'b', b'r', ..] => i + 2,
        _ => return None,
    };
    let hashes = b[j..].iter().take_while(|c| **c == b'#').count();
    (b.get(j + hashes) == Some(&b'"')).then_some(hashes)
}

/// The first path segment of each item in a `{a, b::c, d::{e, f}}` group body.
fn group_heads(body: &str) -> Vec<String> {
    let (mut depth, mut heads, mut item) = (0, Vec::new(), String::new());
    for c in body.chars().chain(std::iter::once(',')) {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                let head: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !head.is_empty() {
                    heads.push(head);
                }
                item.clear();
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            item.push(c);
        }
    }
    heads
}

/// The top-level modules that `code` names through `crate::`.
fn crate_edges(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
        {
            continue; // `agent_activator_crate::`, `$crate::`
        }
        let rest = code[at + "crate::".len()..].trim_start();
        if let Some(body) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = body
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(body.len(), |(i, _)| i);
            out.extend(group_heads(&body[..end]));
        } else {
            let head: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(head);
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `from -> {to -> the files that make the edge}` between top-level modules of `src/`.
fn module_graph(src: &Path, modules: &BTreeSet<String>) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: Graph = BTreeMap::new();
    for file in files {
        let rel = file
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let top = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        if !modules.contains(&top) {
            continue; // lib.rs declares, main.rs is the binary on top of everything
        }
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        for to in crate_edges(&code) {
            if to != top && modules.contains(&to) {
                graph
                    .entry(top.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .insert(rel.clone());
            }
        }
    }
    graph
}

/// A cycle through `graph`'s edges, if there is one (depth-first search).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit<'a>(
        node: &'a str,
        graph: &'a Graph,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flat_map(|m| m.keys()) {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// Edges from a module to one on a higher floor, described with the files that make them.
fn upward_edges(graph: &Graph, floors: &BTreeMap<String, u32>) -> Vec<String> {
    let mut upward = Vec::new();
    for (from, tos) in graph {
        for (to, files) in tos {
            let (Some(f), Some(t)) = (floors.get(from), floors.get(to)) else {
                continue; // the other test names modules missing from the map
            };
            if t > f {
                upward.push(format!(
                    "{from} (floor {f}) -> {to} (floor {t}) in {files:?}"
                ));
            }
        }
    }
    upward
}

#[test]
fn the_module_map_declares_exactly_the_modules_of_lib_rs() {
    let floors =
        declared_floors(&std::fs::read_to_string(root().join("docs/architecture.md")).unwrap());
    let declared: BTreeSet<String> = floors.keys().cloned().collect();
    let modules = lib_modules(&std::fs::read_to_string(root().join("src/lib.rs")).unwrap());
    assert_eq!(
        declared, modules,
        "docs/architecture.md's module map (left) and src/lib.rs (right) disagree"
    );
}

#[test]
fn every_crate_path_points_down_or_along_a_floor_without_a_cycle() {
    let floors =
        declared_floors(&std::fs::read_to_string(root().join("docs/architecture.md")).unwrap());
    let modules = lib_modules(&std::fs::read_to_string(root().join("src/lib.rs")).unwrap());
    let graph = module_graph(&root().join("src"), &modules);
    let upward = upward_edges(&graph, &floors);
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
    if let Some(cycle) = find_cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| format!("{} -> {} in {:?}", w[0], w[1], graph[&w[0]][&w[1]]))
            .collect();
        panic!(
            "import cycle between top-level modules:\n{}",
            steps.join("\n")
        );
    }
}

#[test]
fn the_reader_sees_paths_in_code_and_groups_but_not_in_comments_or_strings() {
    let code = code_only(
        "use crate::{a, b::{c, d}, e::f as g};\n\
         // crate::h\n/* crate::i /* nested crate::j */ */\n\
         let s = \"crate::k\"; let r = r#\"crate::l \"# ; let c = '\"'; let q = '\\'';\n\
         fn x<'a>(v: &'a crate::m::T) {}\ncrate::n::call();",
    );
    assert_eq!(crate_edges(&code), ["a", "b", "e", "m", "n"]);
}

#[test]
fn an_upward_edge_and_a_cycle_are_found() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: Graph = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string())
                .or_default()
                .entry(b.to_string())
                .or_default();
        }
        g
    };
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])),
        None
    );
    let floors: BTreeMap<String, u32> = [("a".to_string(), 1), ("b".to_string(), 0)].into();
    assert!(upward_edges(&graph(&[("a", "b")]), &floors).is_empty());
    assert_eq!(upward_edges(&graph(&[("b", "a")]), &floors).len(), 1);
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
