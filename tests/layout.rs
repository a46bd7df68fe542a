//! The library's layout as docs/design.md draws it: every module belongs,
//! by its folder, to one stage of the pipeline, no module imports one of a
//! later stage or of a parallel stage (the producer and the consumer never
//! import each other), and no modules import each other in a circle. Read from the
//! source (`use crate::…` and `super::…` paths, comments and test modules
//! left out), so a new module must be placed here, and in the docs, before
//! it builds green.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Stages in the order data flows through them, each with a rank and the
/// top-level modules (folders or files of `src/`) that make it up: a module
/// may import modules of its own stage and of lower ranks. Stages of one
/// rank are parallel and may not import each other.
const STAGES: &[(&str, u32, &[&str])] = &[
    ("base", 0, &["log_limit", "shutdown", "web"]),
    ("model", 1, &["model"]),
    ("kafka", 2, &["kafka"]),
    ("store", 3, &["store"]),
    ("publish", 4, &["publish"]),
    ("producer", 5, &["producer"]),
    ("consumer", 5, &["consumer"]),
    ("commands", 6, &["commands", "config", "fuzzing"]),
];

/// Source without comments and without its `#[cfg(test)] mod tests`.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module path of a file under src/ (None for lib.rs and binaries).
fn module_of(relative: &Path) -> Option<String> {
    let text = relative.to_str()?.strip_suffix(".rs")?;
    if text == "lib" || text.starts_with("bin/") {
        return None;
    }
    Some(text.trim_end_matches("/mod").replace('/', "::"))
}

/// `crate::a::b` and, inside a folder module, `super::x` references, as the
/// modules they name.
fn imports(module: &str, code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let parent = module.rsplit_once("::").map(|(p, _)| p);
    for (marker, base) in [("crate::", None), ("super::", parent)] {
        if marker == "super::" && base.is_none() {
            continue;
        }
        let mut rest = code;
        while let Some(at) = rest.find(marker) {
            rest = &rest[at + marker.len()..];
            // `super::{a, b::C}` names several.
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end].split(',').map(str::trim).collect()
            } else {
                vec![rest]
            };
            for name in names {
                let first: String = name
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let candidate = match base {
                    Some(parent) => format!("{parent}::{first}"),
                    None => first.clone(),
                };
                // A deeper path (crate::consumer::machine) names the
                // submodule when there is one.
                let deeper = name
                    .split("::")
                    .nth(1)
                    .map(|second| format!("{candidate}::{second}"));
                let target = match deeper.filter(|d| known.contains(d)) {
                    Some(d) => d,
                    None if known.contains(&candidate) => candidate,
                    // `super::Item` in a folder module: its parent.
                    None => match base {
                        Some(parent) if first.chars().next().is_some_and(char::is_uppercase) => {
                            parent.to_string()
                        }
                        _ => continue,
                    },
                };
                if target != module {
                    found.insert(target);
                }
            }
        }
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut folders = vec![src.clone()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let modules: BTreeMap<String, String> = files
        .iter()
        .filter_map(|path| {
            let module = module_of(path.strip_prefix(&src).unwrap())?;
            Some((module, std::fs::read_to_string(path).unwrap()))
        })
        .collect();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(module, text)| (module.clone(), imports(module, &code_of(text), &known)))
        .collect()
}

/// The stage of a module: that of its top-level module.
fn stage_of(module: &str) -> Option<(&'static str, u32)> {
    let top = module.split("::").next()?;
    STAGES
        .iter()
        .find(|(_, _, modules)| modules.contains(&top))
        .map(|(stage, rank, _)| (*stage, *rank))
}

#[test]
fn every_module_has_a_stage_and_imports_only_along_the_flow() {
    let graph = graph();
    assert!(graph.len() > 30, "read only {} modules", graph.len());
    let mut wrong = Vec::new();
    for (module, imports) in &graph {
        let Some((stage, rank)) = stage_of(module) else {
            wrong.push(format!("{module} has no stage in tests/layout.rs"));
            continue;
        };
        for import in imports {
            let Some((their_stage, their_rank)) = stage_of(import) else {
                continue; // told above
            };
            if their_stage != stage && their_rank >= rank {
                wrong.push(format!(
                    "{module} ({stage}) imports {import} ({their_stage}), which is not upstream of it"
                ));
            }
        }
    }
    for (_, _, modules) in STAGES {
        for module in *modules {
            if !graph.contains_key(*module) {
                wrong.push(format!(
                    "tests/layout.rs names {module}, which is not in src/"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_modules_import_each_other_in_a_circle() {
    let graph = graph();
    // Depth-first search; a module met again on the current path closes a
    // circle.
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut circle = path[at..].to_vec();
            circle.push(module.to_string());
            return Some(circle);
        }
        if !done.insert(module.to_string()) {
            return None;
        }
        path.push(module.to_string());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(circle) = visit(module, &graph, &mut Vec::new(), &mut done) {
            panic!("modules import each other: {}", circle.join(" -> "));
        }
    }
}

/// The reader of imports sees what it must: the checks above are only as
/// good as this.
#[test]
fn imports_are_read_from_use_lines_and_paths_but_not_comments() {
    let known: BTreeSet<String> = ["report", "state", "consumer", "consumer::machine"]
        .into_iter()
        .map(String::from)
        .collect();
    let code = code_of(
        "use crate::report::{encode, key_for};\n\
         // crate::state is only mentioned here\n\
         use super::{machine::Flow, ConsumerConfig};\n\
         fn f() { crate::consumer::machine::x(); }\n",
    );
    let found = imports("consumer::worker", &code, &known);
    let expected: BTreeSet<String> = ["report", "consumer::machine", "consumer"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, expected);
}
