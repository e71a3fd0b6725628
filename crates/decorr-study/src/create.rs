//! `decorr study create`: picks the comparisons (a prompt and seed present in every run, sampled
//! per object pair as the paper did: prompts per pair, seeds per prompt), copies each image
//! re-encoded without metadata (our PNGs name the method in text chunks), and writes the study
//! database with its raters, each rater's random order of the comparisons, a random placement of
//! the methods within each, and repeated comparisons for consistency. Everything random comes
//! from one recorded seed. The study folder is built beside its destination and renamed into
//! place, so a failed create leaves nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rusqlite::params;
use serde::Serialize;

use crate::db::{self, DB_FILE, IMAGES_DIR};
use crate::stats::Xoshiro256StarStar;
use crate::{StudyError, bail};

/// What `decorr study create` was asked for.
#[derive(Debug, Clone, Serialize)]
pub struct CreateConfig {
    /// Run folders (`decorr generate --out`, or one method folder of `decorr compare`).
    pub runs: Vec<PathBuf>,
    /// `{"PROMPT": ["FIRST", "TARGET"]}` (`decorr compare`'s `objects.json`): prompts with the
    /// same pair are sampled together. Without it every prompt is its own pair.
    pub objects_file: Option<PathBuf>,
    pub prompts_per_pair: usize,
    pub seeds_per_prompt: usize,
    /// Named raters; when empty, `raters` anonymous ones (`rater-01`, ...).
    pub rater_names: Vec<String>,
    pub raters: usize,
    /// Comparisons shown a second time to each rater (at the end, in another placement).
    pub repeat: usize,
    pub seed: u64,
    pub out: PathBuf,
}

/// Most raters in a study (`--raters`, or `--rater` names): each gets a token and a row per
/// comparison, so a mistyped count must stop before any of that is built.
pub const MAX_RATERS: usize = 10_000;
/// Most of `--prompts-per-pair`, `--seeds-per-prompt` and `--repeat` (a generate run makes at
/// most a million images per prompt).
pub const MAX_COUNT: usize = 1_000_000;

/// What was made.
#[derive(Debug, Clone)]
pub struct Created {
    pub methods: Vec<String>,
    pub comparisons: usize,
    pub raters: usize,
    pub tasks_per_rater: usize,
    /// Pairs with fewer prompts, or prompts with fewer seeds, than asked (said, not refused).
    pub notes: Vec<String>,
}

/// A random token of 128 bits from the operating system, as 32 hex digits.
pub fn random_token() -> Result<String, StudyError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| StudyError::Msg(format!("no randomness from the operating system: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A run's image files by (prompt, seed).
type ImagesByKey = BTreeMap<(String, u64), PathBuf>;

/// Fisher-Yates with the study's generator.
fn shuffle<T>(v: &mut [T], rng: &mut Xoshiro256StarStar) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

/// `k` of `v` drawn at random (all when there are fewer), in sorted order.
fn sample<T: Ord>(mut v: Vec<T>, k: usize, rng: &mut Xoshiro256StarStar) -> Vec<T> {
    shuffle(&mut v, rng);
    v.truncate(k);
    v.sort();
    v
}

/// Builds the study; see the module header.
pub fn create(c: &CreateConfig) -> Result<Created, StudyError> {
    if c.out.exists() {
        bail!(
            "{} already exists; a study is created once (choose another --out, or serve that one \
             with `decorr study serve {}`)",
            c.out.display(),
            c.out.display()
        );
    }
    if c.runs.len() < 2 {
        bail!("--runs needs at least two run folders (the methods to compare)");
    }
    if c.prompts_per_pair == 0 || c.seeds_per_prompt == 0 {
        bail!("--prompts-per-pair and --seeds-per-prompt must be at least 1");
    }
    for (flag, v, min) in [
        ("--prompts-per-pair", c.prompts_per_pair, 1),
        ("--seeds-per-prompt", c.seeds_per_prompt, 1),
        ("--repeat", c.repeat, 0),
    ] {
        if v > MAX_COUNT {
            bail!(
                "{flag} {v} is more than {MAX_COUNT}, the most it takes; give {flag} \
                 {min}..={MAX_COUNT}"
            );
        }
    }
    // Checked before any name is made: `--raters 100000000` must not build them first.
    if c.raters > MAX_RATERS {
        bail!(
            "--raters {} is more than {MAX_RATERS}, the most raters a study takes; give --raters \
             1..={MAX_RATERS} (or split the raters into several studies)",
            c.raters
        );
    }
    if c.rater_names.len() > MAX_RATERS {
        bail!(
            "{} --rater names are more than {MAX_RATERS}, the most raters a study takes; give at \
             most {MAX_RATERS} (or split the raters into several studies)",
            c.rater_names.len()
        );
    }
    let names: Vec<String> = if c.rater_names.is_empty() {
        if c.raters == 0 {
            bail!("give --raters N (at least 1) or --rater NAME for each rater");
        }
        (1..=c.raters).map(|i| format!("rater-{i:02}")).collect()
    } else {
        c.rater_names.clone()
    };
    let distinct: BTreeSet<&String> = names.iter().collect();
    if distinct.len() != names.len() || names.iter().any(|n| n.trim().is_empty()) {
        bail!("--rater names must be non-empty and distinct");
    }

    // Each run folder: one method, its images by (prompt, seed).
    let mut methods: Vec<(String, PathBuf, ImagesByKey)> = Vec::new();
    for run in &c.runs {
        let images = decorr_runs::eval::run_images(std::slice::from_ref(run))?;
        let mut method_names: BTreeSet<String> = BTreeSet::new();
        let mut by_key = BTreeMap::new();
        for (folder, rec) in images {
            method_names.insert(rec.run.method.clone());
            by_key.insert((rec.run.prompt.clone(), rec.seed), folder.join(&rec.file));
        }
        let name = match method_names.len() {
            0 => bail!("{} lists no images", run.display()),
            1 => method_names.into_iter().next().expect("one"),
            _ => bail!(
                "{} mixes methods ({}): give each method's folder as its own --runs",
                run.display(),
                method_names.into_iter().collect::<Vec<_>>().join(", ")
            ),
        };
        if let Some((_, other, _)) = methods.iter().find(|(n, _, _)| *n == name) {
            bail!(
                "{} and {} both hold method `{name}`: each --runs folder must be another method",
                other.display(),
                run.display()
            );
        }
        methods.push((name, run.clone(), by_key));
    }
    let common: BTreeSet<(String, u64)> = methods
        .iter()
        .map(|(_, _, m)| m.keys().cloned().collect::<BTreeSet<_>>())
        .reduce(|a, b| a.intersection(&b).cloned().collect())
        .unwrap_or_default();
    if common.is_empty() {
        bail!(
            "no prompt and seed is present in every run ({}): generate the same prompts and seeds \
             with each method",
            c.runs
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // Pairs -> prompts -> seeds, sampled.
    let pair_of = pairs_of(c.objects_file.as_deref(), &common)?;
    let mut tree: BTreeMap<String, BTreeMap<String, Vec<u64>>> = BTreeMap::new();
    for (prompt, seed) in &common {
        tree.entry(pair_of[prompt].clone())
            .or_default()
            .entry(prompt.clone())
            .or_default()
            .push(*seed);
    }
    let mut rng = Xoshiro256StarStar::seed_from_u64(c.seed);
    let mut notes = Vec::new();
    let mut chosen: Vec<(String, String, u64)> = Vec::new();
    for (pair, prompts) in &tree {
        // Without an objects file every prompt is its own pair: nothing to say.
        if prompts.len() < c.prompts_per_pair && c.objects_file.is_some() {
            notes.push(format!(
                "pair {pair}: {} prompt(s) in every run, fewer than --prompts-per-pair {}",
                prompts.len(),
                c.prompts_per_pair
            ));
        }
        for p in sample(prompts.keys().collect(), c.prompts_per_pair, &mut rng) {
            let seeds = &prompts[p];
            if seeds.len() < c.seeds_per_prompt {
                notes.push(format!(
                    "prompt {p:?}: {} seed(s) in every run, fewer than --seeds-per-prompt {}",
                    seeds.len(),
                    c.seeds_per_prompt
                ));
            }
            for s in sample(seeds.clone(), c.seeds_per_prompt, &mut rng) {
                chosen.push((pair.clone(), p.clone(), s));
            }
        }
    }
    if c.repeat > chosen.len() {
        bail!(
            "--repeat {} exceeds the {} comparisons; at most as many can be repeated",
            c.repeat,
            chosen.len()
        );
    }

    // Build beside the destination, then rename into place.
    let parent = match c.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)?;
    let tmp = decorr_core::io::temp_dir_beside(&c.out)?;
    std::fs::create_dir(tmp.path().join(IMAGES_DIR))?;
    let mut conn = db::create(&tmp.path().join(DB_FILE))?;
    let tx = conn.transaction()?;
    for (key, value) in [
        ("created_at", db::now_utc()),
        ("seed", c.seed.to_string()),
        ("settings", serde_json::to_string(c)?),
        ("admin_token", random_token()?),
    ] {
        tx.execute(
            "INSERT INTO meta(key, value) VALUES(?1, ?2)",
            params![key, value],
        )?;
    }
    for (name, run, _) in &methods {
        tx.execute(
            "INSERT INTO methods(name, run_dir) VALUES(?1, ?2)",
            params![name, run.display().to_string()],
        )?;
    }
    let method_ids: Vec<i64> = (1..=methods.len() as i64).collect();
    for (k, (pair, prompt, seed)) in chosen.iter().enumerate() {
        let item = k as i64 + 1;
        tx.execute(
            "INSERT INTO items(id, prompt, seed, pair) VALUES(?1, ?2, ?3, ?4)",
            params![item, prompt, *seed as i64, pair],
        )?;
        for (m, (_, _, images)) in methods.iter().enumerate() {
            let source = &images[&(prompt.clone(), *seed)];
            let public = random_token()?;
            copy_without_metadata(
                source,
                &tmp.path().join(IMAGES_DIR).join(format!("{public}.png")),
            )?;
            tx.execute(
                "INSERT INTO images(item_id, method_id, public_id, source) VALUES(?1, ?2, ?3, ?4)",
                params![item, method_ids[m], public, source.display().to_string()],
            )?;
        }
    }
    let n = chosen.len();
    for name in &names {
        tx.execute(
            "INSERT INTO raters(name, token) VALUES(?1, ?2)",
            params![name, random_token()?],
        )?;
        let rater = tx.last_insert_rowid();
        let mut order: Vec<i64> = (1..=n as i64).collect();
        shuffle(&mut order, &mut rng);
        let mut repeats = order.clone();
        shuffle(&mut repeats, &mut rng);
        repeats.truncate(c.repeat);
        let mut first_task: BTreeMap<i64, i64> = BTreeMap::new();
        let shown = order
            .iter()
            .map(|&i| (i, false))
            .chain(repeats.iter().map(|&i| (i, true)));
        for (pos, (item, repeat)) in shown.enumerate() {
            let mut placement = method_ids.clone();
            shuffle(&mut placement, &mut rng);
            tx.execute(
                "INSERT INTO tasks(rater_id, position, item_id, repeat_of, public_id, placement)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    rater,
                    pos as i64 + 1,
                    item,
                    if repeat {
                        first_task.get(&item).copied()
                    } else {
                        None
                    },
                    random_token()?,
                    serde_json::to_string(&placement)?
                ],
            )?;
            if !repeat {
                first_task.insert(item, tx.last_insert_rowid());
            }
        }
    }
    tx.commit()?;
    // Fold the WAL into the main file so the folder is complete as renamed.
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
    drop(conn);
    let tmp = tmp.keep();
    // The temp folder was created private; the study gets the umask's permissions.
    decorr_core::io::make_readable(&tmp).map_err(|e| StudyError::Msg(e.to_string()))?;
    if let Err(e) = std::fs::rename(&tmp, &c.out) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(StudyError::Msg(format!(
            "moving the new study into {}: {e}",
            c.out.display()
        )));
    }
    Ok(Created {
        methods: methods.into_iter().map(|(n, _, _)| n).collect(),
        comparisons: n,
        raters: names.len(),
        tasks_per_rater: n + c.repeat,
        notes,
    })
}

/// The pair (as "FIRST,TARGET") of every prompt, from the objects file; the prompt itself
/// without one.
fn pairs_of(
    objects_file: Option<&Path>,
    common: &BTreeSet<(String, u64)>,
) -> Result<BTreeMap<String, String>, StudyError> {
    let prompts: BTreeSet<&String> = common.iter().map(|(p, _)| p).collect();
    let Some(f) = objects_file else {
        return Ok(prompts
            .into_iter()
            .map(|p| (p.clone(), p.clone()))
            .collect());
    };
    let text = decorr_core::input::read_text(f, "the --objects-file")
        .map_err(|e| StudyError::Msg(e.to_string()))?;
    let map: BTreeMap<String, [String; 2]> = serde_json::from_str(&text).map_err(|e| {
        StudyError::Msg(format!(
            "{}: expected {{\"PROMPT\": [\"FIRST\", \"TARGET\"], ...}} ({e})",
            f.display()
        ))
    })?;
    let missing: Vec<&str> = prompts
        .iter()
        .filter(|p| !map.contains_key(p.as_str()))
        .map(|p| p.as_str())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} names no object pair for: {}",
            f.display(),
            missing.join(" | ")
        );
    }
    Ok(prompts
        .into_iter()
        .map(|p| (p.clone(), map[p].join(",")))
        .collect())
}

/// Decodes `src` and writes its pixels as a fresh PNG (no text chunks, no other metadata).
fn copy_without_metadata(src: &Path, dst: &Path) -> Result<(), StudyError> {
    let img = image::open(src)
        .map_err(|e| StudyError::Msg(format!("reading the image {}: {e}", src.display())))?
        .to_rgb8();
    img.save_with_format(dst, image::ImageFormat::Png)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(out: &Path) -> CreateConfig {
        CreateConfig {
            runs: vec![out.join("a"), out.join("b")],
            objects_file: None,
            prompts_per_pair: 2,
            seeds_per_prompt: 5,
            rater_names: Vec::new(),
            raters: 2,
            repeat: 0,
            seed: 0,
            out: out.join("study"),
        }
    }

    /// Each bound is checked before anything is read or built (the runs do not even exist).
    #[test]
    fn counts_past_their_bounds_are_refused_naming_the_flag() {
        let tmp = tempfile::tempdir().unwrap();
        let refused = |c: CreateConfig, needles: &[&str]| {
            let e = create(&c).expect_err("refused").to_string();
            for n in needles {
                assert!(e.contains(n), "{n:?} not in {e}");
            }
            assert!(!c.out.exists());
        };
        let base = config(tmp.path());
        refused(
            CreateConfig {
                raters: usize::MAX,
                ..base.clone()
            },
            &["--raters", "10000"],
        );
        refused(
            CreateConfig {
                raters: 0,
                rater_names: (0..=MAX_RATERS).map(|i| format!("r{i}")).collect(),
                ..base.clone()
            },
            &["--rater", "10001", "10000"],
        );
        for (flag, c) in [
            (
                "--prompts-per-pair",
                CreateConfig {
                    prompts_per_pair: usize::MAX,
                    ..base.clone()
                },
            ),
            (
                "--seeds-per-prompt",
                CreateConfig {
                    seeds_per_prompt: MAX_COUNT + 1,
                    ..base.clone()
                },
            ),
            (
                "--repeat",
                CreateConfig {
                    repeat: usize::MAX,
                    ..base.clone()
                },
            ),
        ] {
            refused(c, &[flag, "1000000"]);
        }
        // Within the bounds, the runs are what is wrong.
        refused(base, &["no such folder"]);
    }
}
