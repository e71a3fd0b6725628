//! Bounds on what a config file or a flag may ask decorr to allocate. Before a model is built,
//! its config's parameter count (x 4 bytes, f32) is compared with the memory available; before
//! generating, the activations a size and batch imply. Too much is refused with an error that
//! names the size and where it came from, instead of an allocation failure that aborts the
//! process.
//!
//! The limit is `DECORR_MEMORY_LIMIT` when set (bytes, or with a `K`, `M`, `G` or `T` suffix:
//! powers of 1024), else `MemAvailable` of `/proc/meminfo` (Linux), else [`FALLBACK_LIMIT`].

use crate::CoreError;

/// The environment variable that overrides the memory limit.
pub const MEMORY_LIMIT_ENV: &str = "DECORR_MEMORY_LIMIT";

/// The limit where the available memory cannot be read (not Linux): 1 TiB, enough for every real
/// model, and still a refusal of absurd sizes before they abort the process.
pub const FALLBACK_LIMIT: u64 = 1 << 40;

/// The most entries an error lists (mismatched tensors, ...) before "... and N more".
pub const MAX_LISTED_PROBLEMS: usize = 20;

/// The memory decorr may plan to use, and where that number came from.
pub fn memory_limit() -> Result<(u64, &'static str), CoreError> {
    if let Some(v) = std::env::var_os(MEMORY_LIMIT_ENV) {
        let text = v.to_string_lossy();
        return parse_size(&text).map(|b| (b, MEMORY_LIMIT_ENV)).ok_or_else(|| {
            CoreError::TooLarge(format!(
                "{MEMORY_LIMIT_ENV}={text:?} is not a size: give bytes, or a number with K, M, G \
                 or T (e.g. 24G)"
            ))
        });
    }
    Ok(match mem_available() {
        Some(b) => (b, "MemAvailable in /proc/meminfo"),
        None => (FALLBACK_LIMIT, "decorr's default limit"),
    })
}

/// `MemAvailable` of `/proc/meminfo` in bytes, where there is one.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut it = line["MemAvailable:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => n.checked_mul(1024),
        _ => None,
    }
}

/// `123`, `512M`, `24G`, `1.5T` (powers of 1024; a trailing `B`/`iB` is allowed).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 1u64 << 10),
        'm' | 'M' => (&t[..t.len() - 1], 1 << 20),
        'g' | 'G' => (&t[..t.len() - 1], 1 << 30),
        't' | 'T' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v > 0.0 && v * (mult as f64) < u64::MAX as f64)
        .then_some((v * mult as f64) as u64)
}

/// `1.5 GiB`, `320 MiB`, `12 KiB`, `100 B`.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `Err` when `bytes` exceed the memory limit: "`what` needs about N, more than the M available
/// (source); `remedy`".
pub fn check_memory(bytes: u128, what: &str, remedy: &str) -> Result<(), CoreError> {
    let (limit, source) = memory_limit()?;
    check_memory_against(bytes, limit, source, what, remedy)
}

/// [`check_memory`] against an explicit limit (tests, callers that know better).
pub fn check_memory_against(
    bytes: u128,
    limit: u64,
    source: &str,
    what: &str,
    remedy: &str,
) -> Result<(), CoreError> {
    if bytes <= limit as u128 {
        return Ok(());
    }
    let how = if source == MEMORY_LIMIT_ENV {
        MEMORY_LIMIT_ENV.to_string()
    } else {
        format!("{source}; set {MEMORY_LIMIT_ENV} to change the limit")
    };
    Err(CoreError::TooLarge(format!(
        "{what} needs about {}, more than the {} of memory available ({how}); {remedy}",
        human_bytes(bytes),
        human_bytes(limit as u128)
    )))
}

/// `items` joined by newlines, at most [`MAX_LISTED_PROBLEMS`] of them, then `... and N more`.
pub fn capped_list(items: &[String]) -> String {
    let mut out: Vec<&str> = items
        .iter()
        .take(MAX_LISTED_PROBLEMS)
        .map(String::as_str)
        .collect();
    let more;
    if items.len() > MAX_LISTED_PROBLEMS {
        more = format!("  ... and {} more", items.len() - MAX_LISTED_PROBLEMS);
        out.push(&more);
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("24G"), Some(24 << 30));
        assert_eq!(parse_size("1.5 GiB"), Some(3 << 29));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(320 << 20), "320 MiB");
    }

    #[test]
    fn meminfo_is_read_in_kib() {
        let text = "MemTotal:       16318412 kB\nMemFree:  1 kB\nMemAvailable:   8000000 kB\n";
        assert_eq!(parse_meminfo(text), Some(8_000_000 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        // This machine's limit is readable and positive.
        assert!(memory_limit().unwrap().0 > 0);
    }

    #[test]
    fn over_the_limit_names_what_and_how_much() {
        check_memory_against(10, 10, "test", "x", "y").unwrap();
        let e = check_memory_against(
            3 << 30,
            1 << 30,
            "MemAvailable",
            "a 4096x4096 image",
            "lower it",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("a 4096x4096 image needs about 3.0 GiB")
                && e.contains("1.0 GiB")
                && e.contains(MEMORY_LIMIT_ENV)
                && e.ends_with("lower it"),
            "{e}"
        );
        // An estimate far beyond any machine is refused whatever the limit source.
        assert!(check_memory(u128::MAX / 2, "x", "y").is_err());
    }

    #[test]
    fn long_lists_are_capped() {
        let items: Vec<String> = (0..1000).map(|i| format!("  p{i}")).collect();
        let s = capped_list(&items);
        assert_eq!(s.lines().count(), MAX_LISTED_PROBLEMS + 1);
        assert!(s.ends_with("  ... and 980 more"), "{s}");
        assert_eq!(capped_list(&items[..3]).lines().count(), 3);
    }
}
