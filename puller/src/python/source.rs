//! The imports of Python source that runs as a program's main module: a
//! script, or the code of `python3 -c`.
//!
//! A main module is compiled from source at every start (Python caches no
//! `.pyc` for it), so [`super::pyc`] has nothing to read there; this scans
//! the source's statements instead. It is a scanner, not a parser: it
//! splits logical lines (brackets, strings, comments, backslashes, `;`),
//! skips the bodies of functions (they run later, if at all) and reads the
//! `import` and `from … import` statements left. A statement it misreads
//! costs a fetch that is not used, or one that is not made early: never a
//! wrong byte, since what it finds only names files to fetch ahead.

use super::pyc::Import;

/// Source past this is not scanned (a main module is a few KiB).
pub const SOURCE_MAX: usize = 1 << 20;

/// A logical line: its indentation and its text, comments and strings
/// blanked (strings keep their quotes, so that `import` in one is not
/// taken for a statement).
struct Line {
    indent: usize,
    text: String,
}

/// Splits `src` into logical lines and `;`-separated statements.
fn logical_lines(src: &str) -> Vec<Line> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut indent = 0;
    let mut at_line_start = true;
    let mut depth = 0usize;
    let mut chars = src.chars().peekable();
    let push = |text: &mut String, indent: usize, out: &mut Vec<Line>| {
        let t = text.trim();
        if !t.is_empty() {
            out.push(Line {
                indent,
                text: t.to_string(),
            });
        }
        text.clear();
    };
    while let Some(c) = chars.next() {
        if at_line_start {
            match c {
                ' ' => {
                    indent += 1;
                    continue;
                }
                '\t' => {
                    indent = (indent / 8 + 1) * 8;
                    continue;
                }
                '\n' | '\r' | '\x0c' => {
                    indent = 0;
                    continue;
                }
                _ => at_line_start = false,
            }
        }
        match c {
            '#' => {
                while chars.peek().is_some_and(|&n| n != '\n') {
                    chars.next();
                }
            }
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
                text.push(' ');
            }
            '\'' | '"' => {
                let triple = {
                    let mut ahead = chars.clone();
                    ahead.next() == Some(c) && ahead.next() == Some(c)
                };
                if triple {
                    chars.next();
                    chars.next();
                }
                // The string's content is dropped; an unterminated one
                // ends the scan.
                let mut run = 0;
                loop {
                    let Some(s) = chars.next() else {
                        push(&mut text, indent, &mut out);
                        return out;
                    };
                    match s {
                        '\\' => {
                            chars.next();
                            run = 0;
                        }
                        '\n' if !triple => break,
                        s if s == c => {
                            run += 1;
                            if !triple || run == 3 {
                                break;
                            }
                        }
                        _ => run = 0,
                    }
                }
                text.push_str("\"\"");
            }
            '(' | '[' | '{' => {
                depth += 1;
                text.push(c);
            }
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                text.push(c);
            }
            '\n' if depth == 0 => {
                push(&mut text, indent, &mut out);
                indent = 0;
                at_line_start = true;
            }
            ';' if depth == 0 => push(&mut text, indent, &mut out),
            '\n' | '\r' | '\t' => text.push(' '),
            c => text.push(c),
        }
    }
    push(&mut text, indent, &mut out);
    out
}

/// A dotted name of identifiers (`a.b.c`), or `None`.
fn dotted(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.split('.').all(|part| {
            let mut cs = part.chars();
            cs.next().is_some_and(|c| c == '_' || c.is_alphabetic())
                && cs.all(|c| c == '_' || c.is_alphanumeric())
        });
    ok.then(|| name.to_string())
}

/// `a.b as c` -> `a.b`.
fn without_alias(item: &str) -> &str {
    item.split_whitespace().next().unwrap_or("")
}

/// The imports of one statement.
fn statement_imports(text: &str, out: &mut Vec<Import>) {
    if let Some(rest) = text.strip_prefix("import ") {
        for item in rest.split(',') {
            if let Some(name) = dotted(without_alias(item.trim())) {
                out.push(Import {
                    level: 0,
                    name,
                    fromlist: Vec::new(),
                });
            }
        }
    } else if let Some(rest) = text.strip_prefix("from ") {
        let Some((module, names)) = rest.split_once(" import ") else {
            return;
        };
        let module = module.trim();
        let level = module.chars().take_while(|&c| c == '.').count();
        let name = module[level..].trim();
        let name = if name.is_empty() {
            String::new()
        } else {
            match dotted(name) {
                Some(n) => n,
                None => return,
            }
        };
        if level == 0 && name.is_empty() {
            return;
        }
        let names = names.trim().trim_start_matches('(').trim_end_matches(')');
        let fromlist = names
            .split(',')
            .filter_map(|item| dotted(without_alias(item.trim())))
            .filter(|n| !n.contains('.'))
            .collect();
        out.push(Import {
            level: level as u32,
            name,
            fromlist,
        });
    }
}

/// The imports that source `src` runs when it is executed as a module: its
/// own statements and those in its `if`, `try`, `with`, `for` and class
/// blocks, not those in functions. In the order written; `*` left out.
pub fn source_imports(src: &str) -> Vec<Import> {
    let src = match src.char_indices().nth(SOURCE_MAX) {
        Some((end, _)) => &src[..end],
        None => src,
    };
    let mut out = Vec::new();
    // Open blocks: their indentation, and whether a function's.
    let mut blocks: Vec<(usize, bool)> = Vec::new();
    for line in logical_lines(src) {
        while blocks.last().is_some_and(|&(i, _)| i >= line.indent) {
            blocks.pop();
        }
        let in_function = blocks.iter().any(|&(_, f)| f);
        let text = line.text.as_str();
        let is_def = text.starts_with("def ") || text.starts_with("async def ");
        if text.ends_with(':') || is_def {
            blocks.push((line.indent, is_def));
        }
        if in_function {
            continue;
        }
        // `if x: import y` on one line.
        let statement = match text.split_once(": ") {
            Some((head, tail)) if !is_def && (head.starts_with("if ") || head == "try") => tail,
            _ => text,
        };
        statement_imports(statement.trim(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(src: &str) -> Vec<(u32, String, Vec<String>)> {
        source_imports(src)
            .into_iter()
            .map(|i| (i.level, i.name, i.fromlist))
            .collect()
    }

    fn plain(name: &str) -> (u32, String, Vec<String>) {
        (0, name.to_string(), Vec::new())
    }

    #[test]
    fn reads_the_imports_of_a_one_liner() {
        assert_eq!(
            names("import numpy, pandas; print('ready', numpy.__version__)"),
            vec![plain("numpy"), plain("pandas")]
        );
        assert_eq!(
            names("import json, sys; print('ready', sys.version.split()[0])"),
            vec![plain("json"), plain("sys")]
        );
    }

    #[test]
    fn reads_every_form_of_import() {
        let src = "\
import os.path as p, xml.dom
from collections import (
    OrderedDict as OD,  # a comment
    abc,
)
from . import sibling
from ..pkg.mod import a, b as c
from x import *
if True: import inline_if
";
        assert_eq!(
            names(src),
            vec![
                plain("os.path"),
                plain("xml.dom"),
                (
                    0,
                    "collections".into(),
                    vec!["OrderedDict".into(), "abc".into()]
                ),
                (1, String::new(), vec!["sibling".into()]),
                (2, "pkg.mod".into(), vec!["a".into(), "b".into()]),
                (0, "x".into(), vec![]),
                plain("inline_if"),
            ]
        );
    }

    #[test]
    fn skips_functions_strings_and_comments_but_not_blocks_that_run() {
        let src = r#"
"""import not_a_module
"""
# import commented
x = "import in_a_string"
try:
    import fast_json
except ImportError:
    import json as fast_json
class C:
    import in_class_body
    def method(self):
        import in_method
def f():
    import in_function
    if x:
        import deeper
async def g():
    import in_coroutine
if __name__ == "__main__":
    from app import main
"#;
        assert_eq!(
            names(src),
            vec![
                plain("fast_json"),
                plain("json"),
                plain("in_class_body"),
                (0, "app".into(), vec!["main".into()]),
            ]
        );
    }

    #[test]
    fn hostile_or_broken_source_gives_no_paths_and_no_panic() {
        for src in [
            "import ../../etc/passwd",
            "from /abs import x",
            "import a..b",
            "from . import ../x",
            "import 'unterminated",
            "\"\"\"never closed import x",
            "((((((((( import x",
            "from import x",
            "from . import",
            "import \\",
            "\t\timport deep_tab",
            "",
        ] {
            for i in source_imports(src) {
                assert!(
                    !i.name.contains('/') && !i.name.contains(".."),
                    "{src}: {i:?}"
                );
                assert!(
                    i.fromlist.iter().all(|f| dotted(f).is_some()),
                    "{src}: {i:?}"
                );
            }
        }
        // Past the bound nothing more is read.
        let long = format!("{}\nimport late", "x = 1\n".repeat(SOURCE_MAX / 6 + 1));
        assert!(names(&long).is_empty());
    }
}
