//! README's set-up commands on the tiny models (assets/sd-tiny, assets/sdxl-tiny), run as
//! written: the commands are read from README.md itself (the `cargo run --release -p
//! decorr-cli -- ...` lines of its first `sh` block that use them), only `--out` is pointed at
//! a temp folder, so the quick start a new user copies cannot drift from what works.

mod common;

use std::path::Path;
use std::process::Command;

use common::text;

/// The root of the repository (README's relative paths start there).
fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The decorr arguments of every sd-tiny command in README's first `sh` block, continuation
/// lines joined; double-quoted words kept whole.
fn readme_commands() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("README has a sh block");
    let joined = block.replace("\\\n", " ");
    let prefix = "cargo run --release -p decorr-cli --";
    joined
        .lines()
        .filter(|l| {
            l.starts_with(prefix)
                && (l.contains("assets/sd-tiny") || l.contains("assets/sdxl-tiny"))
        })
        .map(|l| words(&l[prefix.len()..]))
        .collect()
}

fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[test]
fn readme_quick_start_commands_run_as_written() {
    let commands = readme_commands();
    let names: Vec<&str> = commands.iter().map(|c| c[0].as_str()).collect();
    assert_eq!(
        names,
        ["fix", "fix", "compare"],
        "README's sd-tiny commands changed"
    );
    let tmp = tempfile::tempdir().unwrap();
    for (i, mut args) in commands.into_iter().enumerate() {
        let out = args
            .iter()
            .position(|a| a == "--out")
            .expect("each command names --out");
        args[out + 1] = tmp.path().join(format!("out{i}")).display().to_string();
        let o = Command::new(env!("CARGO_BIN_EXE_decorr"))
            .args(&args)
            .current_dir(root())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}\n{}", text(&o));
        let page = if args[0] == "fix" {
            "report.html"
        } else {
            "index.html"
        };
        assert!(
            tmp.path().join(format!("out{i}")).join(page).is_file(),
            "{args:?}: no {page}"
        );
    }
}
