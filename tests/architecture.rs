//! The module rules of ARCHITECTURE.md hold in `src/`: every `crate::` path in a module's code
//! names a module it may use, and no source file is big because of its code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Most lines of code a source file may have (doc comments, comments, blank lines and a
/// trailing `#[cfg(test)] mod tests` not counted).
const MAX_CODE_LINES: usize = 600;

/// `module -> modules it may use`, from ARCHITECTURE.md's table.
fn rules() -> BTreeMap<String, BTreeSet<String>> {
    let text =
        std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let start = text
        .find("<!-- module-rules:start -->")
        .expect("ARCHITECTURE.md has the module-rules markers");
    let end = text.find("<!-- module-rules:end -->").expect("end marker");
    let names = |cell: &str| -> Vec<String> {
        cell.split(',')
            .map(|name| name.trim().trim_matches('`').to_string())
            .filter(|name| !name.is_empty())
            .collect()
    };
    let mut rules = BTreeMap::new();
    for line in text[start..end].lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
        assert_eq!(cells.len(), 2, "a rule row has two cells: {line}");
        let module = names(cells[0]).pop().expect("a module name");
        rules.insert(module, names(cells[1]).into_iter().collect());
    }
    rules
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file: without its trailing `#[cfg(test)] mod tests { .. }`, comments and
/// blank lines.
fn code_lines(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(3)
        .position(|w| {
            w[0].trim() == "#[cfg(test)]"
                && (w[1].starts_with("mod tests") || w[2].starts_with("mod tests"))
        })
        .unwrap_or(lines.len());
    lines[..end]
        .iter()
        .map(|line| line.trim())
        .filter(|line| !line.is_empty() && !line.starts_with("//"))
        .collect()
}

#[test]
fn modules_use_only_the_modules_above_them() {
    let rules = rules();
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut broken = Vec::new();
    let mut seen_modules = BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src");
        let top = relative
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let name = file.file_name().expect("name").to_string_lossy();
        if top == "lib" || name == "tests.rs" || name == "loom_tests.rs" {
            continue;
        }
        seen_modules.insert(top.clone());
        let Some(allowed) = rules.get(&top) else {
            broken.push(format!(
                "{}: module `{top}` is not in ARCHITECTURE.md",
                relative.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read");
        for (number, line) in code_lines(&text).iter().enumerate() {
            let mut rest = *line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let used: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let is_module = used.chars().next().is_some_and(|c| c.is_ascii_lowercase());
                if is_module && used != top && !allowed.contains(&used) {
                    broken.push(format!(
                        "{}: `{top}` uses `crate::{used}` (code line {}): {line}",
                        relative.display(),
                        number + 1
                    ));
                }
                if !is_module && !used.is_empty() {
                    broken.push(format!(
                        "{}: `crate::{used}` goes through lib.rs's re-exports; name the \
                         module instead: {line}",
                        relative.display()
                    ));
                }
            }
        }
    }
    let listed: BTreeSet<String> = rules.keys().cloned().collect();
    assert_eq!(
        listed, seen_modules,
        "ARCHITECTURE.md's table lists exactly the top-level modules of src/"
    );
    assert!(
        broken.is_empty(),
        "module rules broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn no_source_file_is_big_because_of_its_code() {
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let big: Vec<String> = files
        .iter()
        // A test module in a file of its own (`tests.rs`, `loom_tests.rs`) is test code.
        .filter(|file| !file.to_string_lossy().ends_with("tests.rs"))
        .filter_map(|file| {
            let text = std::fs::read_to_string(file).expect("read");
            let count = code_lines(&text).len();
            (count > MAX_CODE_LINES).then(|| format!("{}: {count} lines of code", file.display()))
        })
        .collect();
    assert!(
        big.is_empty(),
        "over {MAX_CODE_LINES} lines of code:\n{}",
        big.join("\n")
    );
}

#[test]
fn the_checks_catch_what_they_look_for() {
    // The code-line count leaves out comments, blank lines and the test module.
    let text =
        "//! doc\nfn a() {}\n\n// note\nfn b() {}\n#[cfg(test)]\nmod tests {\n fn c() {}\n}\n";
    assert_eq!(code_lines(text), ["fn a() {}", "fn b() {}"]);
    // The table parses into rules that forbid an upward use.
    let rules = rules();
    assert!(rules["hot"].contains("clock"));
    assert!(
        !rules["hot"].contains("watchdog"),
        "the hot path never reaches up"
    );
}
