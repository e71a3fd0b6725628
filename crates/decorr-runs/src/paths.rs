//! Paths that a file decorr reads (a manifest, a shard's manifest) lists: they may only name
//! files inside the folder that holds the listing file, so a crafted manifest cannot make
//! `decorr eval run` read `/etc/hostname` or `../../x.png`.

use std::path::{Component, Path, PathBuf};

use crate::bail;
use crate::error::{Context, Result};

/// The rule, as errors state it.
const RULE: &str = "a manifest may only name files inside its own folder";

/// Checks `entry` without touching the disk: a relative path of plain names (no root, no drive
/// prefix, no `..`, not empty). `listing` is the file that lists it (for the message).
pub fn check_relative(listing: &Path, entry: &str) -> Result<()> {
    let problem = if entry.is_empty() {
        Some("is empty")
    } else if entry.contains('\0') {
        Some("contains a NUL byte")
    } else {
        let path = Path::new(entry);
        if path.is_absolute() || path.has_root() {
            Some("is an absolute path")
        } else {
            path.components().find_map(|c| match c {
                Component::ParentDir => Some("has a `..` component"),
                Component::Prefix(_) | Component::RootDir => Some("is an absolute path"),
                Component::CurDir | Component::Normal(_) => None,
            })
        }
    };
    if let Some(problem) = problem {
        bail!(
            "{} lists {entry:?}, which {problem}: refused ({RULE})",
            listing.display()
        );
    }
    Ok(())
}

/// `dir/entry`, after checking that `entry` is a plain relative path ([`check_relative`]) and,
/// when the file exists, that it resolves (symbolic links followed) to a file inside `dir`.
/// A missing file is returned as is, for the caller to report.
pub fn inside(dir: &Path, listing: &Path, entry: &str) -> Result<PathBuf> {
    check_relative(listing, entry)?;
    let path = dir.join(entry);
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(path);
    }
    let root = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let real = match path.canonicalize() {
        Ok(p) => p,
        // A dangling link: where it points cannot be checked, so it is refused.
        Err(_) if path.symlink_metadata().is_ok_and(|m| m.is_symlink()) => {
            bail!(
                "{} lists {entry:?}, a symbolic link that does not resolve: refused ({RULE})",
                listing.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("resolving {}", path.display())),
    };
    if !real.starts_with(&root) {
        bail!(
            "{} lists {entry:?}, which resolves to {} outside {}: refused ({RULE}; \
             symbolic links must stay inside it)",
            listing.display(),
            real.display(),
            root.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_names_pass_and_escapes_are_refused() {
        let m = Path::new("run/manifest.json");
        for ok in [
            "seed-000001.png",
            "sub/seed-000001.png",
            "./seed-000001.png",
        ] {
            check_relative(m, ok).unwrap();
        }
        for (bad, why) in [
            ("/etc/hostname", "absolute"),
            ("../../x.png", "`..`"),
            ("sub/../../x.png", "`..`"),
            ("", "empty"),
        ] {
            let e = check_relative(m, bad).unwrap_err().to_string();
            assert!(
                e.contains("run/manifest.json")
                    && e.contains(why)
                    && e.contains("inside its own folder"),
                "{bad}: {e}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_must_resolve_inside_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(tmp.path().join("secret.png"), "x").unwrap();
        std::fs::write(dir.join("sub/a.png"), "x").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret.png"), dir.join("out.png")).unwrap();
        std::os::unix::fs::symlink(dir.join("sub/a.png"), dir.join("in.png")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("nope.png"), dir.join("dangling.png")).unwrap();
        let m = dir.join("manifest.json");
        assert_eq!(inside(&dir, &m, "in.png").unwrap(), dir.join("in.png"));
        assert_eq!(
            inside(&dir, &m, "sub/a.png").unwrap(),
            dir.join("sub/a.png")
        );
        assert_eq!(
            inside(&dir, &m, "missing.png").unwrap(),
            dir.join("missing.png")
        );
        let e = inside(&dir, &m, "out.png").unwrap_err().to_string();
        assert!(e.contains("out.png") && e.contains("outside"), "{e}");
        let e = inside(&dir, &m, "dangling.png").unwrap_err().to_string();
        assert!(e.contains("does not resolve"), "{e}");
    }
}
