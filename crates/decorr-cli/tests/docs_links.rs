//! The user docs hold together: every relative link and image in README.md and docs/**/*.md
//! resolves to a file or folder of the repository (and a `#fragment` into a Markdown file names
//! one of its headings), no link leaves the repository, README stays a short guide (at most
//! 320 lines), and no page refers to material outside the repository.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// The most lines README.md may have: the guide stays short, the reference lives in docs/.
const README_MAX_LINES: usize = 320;

/// Text no page may contain: paths and files outside the repository.
const FORBIDDEN: [&str; 3] = ["../shared", "METHOD.md", "BASELINES.md"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// README.md and every `.md` file under docs/, recursively, sorted.
fn pages() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let root = root();
    let mut out = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut out);
    out.sort();
    out
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// A link found in a page: its 1-based line and its target as written.
struct Link {
    line: usize,
    target: String,
}

/// The text outside fenced code blocks, line by line, with inline code spans blanked out
/// (a link's text may hold code: `[`decorr fix`](fix.md)` keeps its `](fix.md)`).
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker = if trimmed.starts_with("```") {
            Some("```")
        } else if trimmed.starts_with("~~~") {
            Some("~~~")
        } else {
            None
        };
        match (fence, marker) {
            (None, Some(m)) => {
                fence = Some(m);
                continue;
            }
            (Some(f), Some(m)) if f == m => {
                fence = None;
                continue;
            }
            (Some(_), _) => continue,
            (None, None) => {}
        }
        let mut kept = String::new();
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                kept.push(c);
            }
        }
        out.push((i + 1, kept));
    }
    out
}

/// Every inline link and image target (`[text](target)`, `![alt](target)`) and every
/// reference definition (`[label]: target`) outside code.
fn links(text: &str) -> Vec<Link> {
    let mut out = Vec::new();
    for (line, prose) in prose_lines(text) {
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            // The target ends at the parenthesis that closes this one.
            let mut depth = 0usize;
            let mut end = after.len();
            for (i, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        end = i;
                        break;
                    }
                    ')' => depth -= 1,
                    _ => {}
                }
            }
            let inner = after[..end].trim();
            // `<target>` or `target "title"`.
            let target = if let Some(t) = inner.strip_prefix('<') {
                t.split('>').next().unwrap_or("")
            } else {
                inner.split_whitespace().next().unwrap_or("")
            };
            out.push(Link {
                line,
                target: target.to_string(),
            });
            rest = &after[end.min(after.len())..];
        }
        let t = prose.trim_start();
        if t.starts_with('[')
            && let Some(close) = t.find("]:")
            && !t[1..close].contains(']')
        {
            let target = t[close + 2..].split_whitespace().next().unwrap_or("");
            out.push(Link {
                line,
                target: target.trim_matches(['<', '>']).to_string(),
            });
        }
    }
    out
}

/// External links are not checked (no network); pure `#anchors` are checked separately.
fn is_external(target: &str) -> bool {
    let lower = target.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("mailto:")
}

/// `dir/target` resolved without touching the file system; `None` when it climbs above the
/// repository root (or is absolute).
fn resolve_inside(root: &Path, dir: &Path, target: &str) -> Option<PathBuf> {
    if target.starts_with('/') || target.starts_with('\\') {
        return None;
    }
    let mut parts: Vec<String> = dir
        .strip_prefix(root)
        .ok()?
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for c in Path::new(target).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// GitHub's anchor of a heading: lower case, spaces to `-`, punctuation other than `-` and `_`
/// dropped; a repeated heading gets `-1`, `-2`, ...
fn anchors(text: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    let mut fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fence = !fence;
            continue;
        }
        if fence {
            continue;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if hashes == 0 || hashes > 6 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let slug: String = line[hashes..]
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                '-' | '_' => Some(c),
                c if c.is_alphanumeric() => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.push(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

#[test]
fn every_relative_link_and_image_resolves_inside_the_repository() {
    let root = root();
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let dir = page.parent().unwrap();
        for link in links(&text) {
            let at = format!("{}:{}", rel(&page), link.line);
            let target = link.target.as_str();
            if target.is_empty() {
                problems.push(format!("{at}: empty link target"));
                continue;
            }
            if is_external(target) || target.starts_with('#') {
                continue;
            }
            if target.contains("://") || target.starts_with("file:") {
                problems.push(format!("{at}: {target} is not a path in the repository"));
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target, None),
            };
            let path = path.split('?').next().unwrap();
            checked += 1;
            let Some(resolved) = resolve_inside(&root, dir, path) else {
                problems.push(format!("{at}: {target} leaves the repository"));
                continue;
            };
            if !resolved.exists() {
                problems.push(format!(
                    "{at}: {target} does not exist ({})",
                    rel(&resolved)
                ));
                continue;
            }
            // Through a symbolic link, still inside.
            match resolved.canonicalize() {
                Ok(real) if real.starts_with(&root) => {}
                _ => {
                    problems.push(format!("{at}: {target} resolves outside the repository"));
                    continue;
                }
            }
            if let Some(fragment) = fragment
                && resolved.extension().is_some_and(|e| e == "md")
                && resolved.is_file()
            {
                let known = anchors(&std::fs::read_to_string(&resolved).unwrap());
                if !known.iter().any(|a| a == fragment) {
                    problems.push(format!(
                        "{at}: {target}: no heading #{fragment} in {} (it has: {})",
                        rel(&resolved),
                        known.join(", ")
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
    assert!(
        checked > 20,
        "only {checked} relative links found: is the parser right?"
    );
}

#[test]
fn anchors_within_a_page_name_its_headings() {
    let mut problems = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let known = anchors(&text);
        for link in links(&text) {
            if let Some(fragment) = link.target.strip_prefix('#')
                && !known.iter().any(|a| a == fragment)
            {
                problems.push(format!(
                    "{}:{}: no heading #{fragment}",
                    rel(&page),
                    link.line
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn readme_is_a_short_guide() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines (at most {README_MAX_LINES}): move reference material to docs/"
    );
}

#[test]
fn no_page_refers_outside_the_repository() {
    let mut problems = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for (i, line) in text.lines().enumerate() {
            for word in FORBIDDEN {
                if line.contains(word) {
                    problems.push(format!("{}:{}: {word}: {line}", rel(&page), i + 1));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_link_parser_finds_links_and_images_and_skips_code() {
    let text = "see [a](x.md#h) and ![img](../p.png \"t\") and [`code`](<y z.md>)\n\
                `[not](a link)` and [ext](https://e.org)\n\
                ```sh\n[no](inside.md)\n```\n\
                [ref]: refs/r.md\n";
    let found: Vec<(usize, String)> = links(text)
        .into_iter()
        .map(|l| (l.line, l.target))
        .collect();
    assert_eq!(
        found,
        [
            (1, "x.md#h".to_string()),
            (1, "../p.png".to_string()),
            (1, "y z.md".to_string()),
            (2, "https://e.org".to_string()),
            (6, "refs/r.md".to_string()),
        ]
    );
    let root = Path::new("/r");
    assert_eq!(
        resolve_inside(root, Path::new("/r/docs/commands"), "../../README.md"),
        Some(PathBuf::from("/r/README.md"))
    );
    assert_eq!(resolve_inside(root, Path::new("/r/docs"), "../../x"), None);
    assert_eq!(resolve_inside(root, Path::new("/r"), "/etc/passwd"), None);
    assert_eq!(
        anchors("# A: b's (`--c d`)\n## A: b's (`--c d`)\n```\n# no\n```\n"),
        ["a-bs---c-d", "a-bs---c-d-1"]
    );
}
