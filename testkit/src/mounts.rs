//! The mount table, as tests and benchmarks look at it.

use std::path::Path;

/// The topmost mount at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub fstype: String,
    pub source: String,
}

/// The topmost mount at `path` (canonical, without spaces: the table
/// escapes them), from /proc/self/mountinfo: later lines are mounted later,
/// so on top of earlier ones.
pub fn top_mount(path: &Path) -> Option<Mount> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table.lines().rev().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        let dash = f.iter().position(|x| *x == "-")?;
        if Path::new(f.get(4)?) != path {
            return None;
        }
        Some(Mount {
            fstype: f.get(dash + 1)?.to_string(),
            source: f.get(dash + 2)?.to_string(),
        })
    })
}
