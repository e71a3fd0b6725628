//! `cargo xtask fuzz`: a self-contained mutation fuzzer that runs on stable Rust (cargo-fuzz
//! needs nightly) for a bounded time, for CI.
//!
//! Targets:
//! - `ckpt`: `decorr_convert::ckpt::read_ckpt_bytes` (zip and legacy PyTorch files). Zip seeds
//!   are mutated entry by entry (mostly `data.pkl`, with pickle opcodes as a dictionary) and
//!   re-zipped, so mutations get past the zip's CRCs; sometimes the zip bytes themselves.
//! - `safetensors`: `decorr_convert::tensor::read_safetensors_bytes`, burn's `SafetensorsStore`
//!   (header, then every tensor's data; the path `decorr_core::weights::load_safetensors`
//!   takes) and `decorr_core::weights::read_tensors_f32`. Headers are mutated as JSON (offsets,
//!   shapes, dtypes) with the length prefix kept right or not, and as bytes.
//! - `config`: every `config.json`-like text through the UNet, VAE and CLIP config parsers and
//!   their `validate()`, and `SchedulerConfig::from_json_str`, then building its scheduler.
//!   JSON-aware mutations replace values with huge, negative, zero, fractional, non-finite
//!   (`NaN`, `Infinity`, `1e400`), wrongly typed or deeply nested ones, add known keys, drop
//!   keys and resize arrays.
//!
//! Seeds are the committed fixtures under `tests/fixtures`. The RNG is seeded (`--seed`), so a
//! run's input sequence is reproducible. Generic mutations: bit flips, random bytes, byte
//! insertion and deletion, interesting integers (1/2/4/8 bytes, both endians), small
//! arithmetic, block duplication, splicing with another seed, truncation; 1 to 4 stacked per
//! input. Inputs that give an outcome not seen before (a new kind of error) join the corpus.
//!
//! Each target runs in a worker process (this binary again) under an address-space limit, each
//! input under `catch_unwind`. A panic saves the input under `target/fuzz-crashes/` and is
//! reported with the panic message and where it was raised (one report per location). An abort
//! (allocation failure, stack overflow) or a hang kills the worker: the supervisor saves the
//! input the worker was running (it is written to `.current-<target>` before each run) and
//! restarts the worker. Any finding makes the command exit non-zero.
//! `--replay FILE` runs one saved input in-process and prints what each reader says;
//! `DECORR_FUZZ_SHOW=1` prints each new outcome as it is found.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Ckpt,
    Safetensors,
    Config,
    All,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Ckpt => "ckpt",
            Target::Safetensors => "safetensors",
            Target::Config => "config",
            Target::All => "all",
        }
    }
    fn each(self) -> Vec<Target> {
        match self {
            Target::All => vec![Target::Ckpt, Target::Safetensors, Target::Config],
            t => vec![t],
        }
    }
}

pub struct Options {
    pub seconds: f64,
    pub target: Target,
    pub seed: u64,
    pub crash_dir: Option<PathBuf>,
    pub memory_mb: u64,
    pub replay: Option<PathBuf>,
    pub worker: bool,
}

/// A worker that reports no progress for this long is killed as hung.
const HANG_SECS: u64 = 30;
/// Worker restarts (after an abort or a hang) per target.
const MAX_RESTARTS: usize = 5;
/// Inputs with new outcomes kept per target.
const MAX_EXTRA_CORPUS: usize = 512;

impl Target {
    /// Mutants are cut to this length (stacked duplications would otherwise grow them without
    /// bound, and memory in proportion, which is not what is being looked for).
    fn max_input(self) -> usize {
        match self {
            Target::Config => 1 << 20,
            _ => 8 << 20,
        }
    }
    /// The largest input kept in the corpus.
    fn max_kept(self) -> usize {
        match self {
            Target::Config => 64 << 10,
            _ => 4 << 20,
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root")
        .to_path_buf()
}

fn default_crash_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("fuzz-crashes")
}

pub fn run(opts: Options) -> Result<()> {
    let crash_dir = opts.crash_dir.clone().unwrap_or_else(default_crash_dir);
    std::fs::create_dir_all(&crash_dir)
        .with_context(|| format!("creating {}", crash_dir.display()))?;
    if let Some(path) = &opts.replay {
        return replay(opts.target, path);
    }
    if opts.worker {
        let code = worker(&opts, &crash_dir)?;
        std::process::exit(code);
    }
    supervise(&opts, &crash_dir)
}

// ------------------------------------------------------------------------------ supervisor

struct TargetReport {
    inputs: u64,
    seconds: f64,
    findings: usize,
    /// Distinct outcomes (ok, kinds of error) of the last worker.
    outcomes: u64,
}

fn supervise(opts: &Options, crash_dir: &Path) -> Result<()> {
    let targets = opts.target.each();
    let per_target = opts.seconds / targets.len() as f64;
    println!(
        "fuzz: {} for {:.0} s each (seed {}, address space {} MiB per worker), findings go to {}",
        targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        per_target,
        opts.seed,
        opts.memory_mb,
        crash_dir.display()
    );
    let mut reports = Vec::new();
    for t in targets {
        let r = supervise_target(t, per_target, opts, crash_dir)?;
        println!(
            "fuzz {}: {} inputs in {:.1} s ({:.0}/s), {} distinct outcomes, {}",
            t.name(),
            r.inputs,
            r.seconds,
            r.inputs as f64 / r.seconds.max(1e-9),
            r.outcomes,
            match r.findings {
                0 => "no crash".to_string(),
                n => format!("{n} finding(s)"),
            }
        );
        reports.push((t, r));
    }
    let inputs: u64 = reports.iter().map(|(_, r)| r.inputs).sum();
    let seconds: f64 = reports.iter().map(|(_, r)| r.seconds).sum();
    let findings: usize = reports.iter().map(|(_, r)| r.findings).sum();
    if findings > 0 {
        println!(
            "fuzz: FAILED: {findings} finding(s) in {inputs} inputs over {seconds:.0} s; inputs \
             saved under {} (replay one with `cargo xtask fuzz --target T --replay FILE`)",
            crash_dir.display()
        );
        std::process::exit(1);
    }
    println!("fuzz: {inputs} inputs over {seconds:.0} s, no crash");
    Ok(())
}

enum Msg {
    Progress(u64),
    Done {
        inputs: u64,
        findings: usize,
        outcomes: u64,
    },
    Line(String),
}

fn supervise_target(
    target: Target,
    seconds: f64,
    opts: &Options,
    crash_dir: &Path,
) -> Result<TargetReport> {
    let exe = std::env::current_exe()?;
    let current = crash_dir.join(format!(".current-{}", target.name()));
    let start = Instant::now();
    let mut report = TargetReport {
        inputs: 0,
        seconds: 0.0,
        findings: 0,
        outcomes: 0,
    };
    for restart in 0..=MAX_RESTARTS {
        let left = seconds - start.elapsed().as_secs_f64();
        if left < 0.5 && restart > 0 {
            break;
        }
        let _ = std::fs::remove_file(&current);
        let mut child = Command::new(&exe)
            .args([
                "fuzz",
                "--worker",
                "--target",
                target.name(),
                "--seconds",
                &format!("{:.3}", left.max(0.5)),
                "--seed",
                &opts.seed.wrapping_add(restart as u64).to_string(),
                "--memory-mb",
                &opts.memory_mb.to_string(),
                "--crash-dir",
            ])
            .arg(crash_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting a fuzz worker")?;
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        let tx_out = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let msg = if let Some(n) = line.strip_prefix("@@progress ") {
                    Msg::Progress(n.parse().unwrap_or(0))
                } else if let Some(rest) = line.strip_prefix("@@done ") {
                    let mut it = rest.split(' ').map(|x| x.parse().unwrap_or(0u64));
                    Msg::Done {
                        inputs: it.next().unwrap_or(0),
                        findings: it.next().unwrap_or(0) as usize,
                        outcomes: it.next().unwrap_or(0),
                    }
                } else {
                    Msg::Line(line)
                };
                if tx_out.send(msg).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().expect("piped");
        let stderr_tail = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            let text = String::from_utf8_lossy(&buf).into_owned();
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        });
        drop(tx);
        let mut last_progress = Instant::now();
        let mut progress = 0u64;
        let mut done = None;
        let mut hung = false;
        let mut panics = 0usize;
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Msg::Progress(n)) => {
                    progress = n;
                    last_progress = Instant::now();
                }
                Ok(Msg::Done {
                    inputs,
                    findings,
                    outcomes,
                }) => done = Some((inputs, findings, outcomes)),
                Ok(Msg::Line(l)) => {
                    // Counted here too, in case the worker dies before its summary.
                    if l.contains(": PANIC `") {
                        panics += 1;
                    }
                    println!("{l}")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if done.is_none() && last_progress.elapsed() > Duration::from_secs(HANG_SECS) {
                hung = true;
                let _ = child.kill();
            }
        }
        let status = child.wait()?;
        let tail = stderr_tail.join().unwrap_or_default();
        match done {
            Some((inputs, findings, outcomes))
                if status.code().is_some_and(|c| c == 0 || c == 3) =>
            {
                report.inputs += inputs;
                report.findings += findings.max(panics);
                report.outcomes = outcomes;
                break;
            }
            _ => {
                report.inputs += progress;
                report.findings += panics + 1;
                let what = if hung {
                    format!("HANG (no progress for {HANG_SECS} s)")
                } else {
                    format!("ABORT ({status})")
                };
                match std::fs::read(&current) {
                    Ok(bytes) => {
                        let saved = save_finding(crash_dir, target, "abort", &bytes)?;
                        println!(
                            "fuzz {}: {what} on the input saved as {}\n{tail}",
                            target.name(),
                            saved.display()
                        );
                    }
                    Err(_) => println!(
                        "fuzz {}: {what} before any input ran\n{tail}",
                        target.name()
                    ),
                }
                if restart == MAX_RESTARTS {
                    println!("fuzz {}: too many worker deaths, giving up", target.name());
                }
            }
        }
    }
    let _ = std::fs::remove_file(&current);
    let _ = std::fs::remove_file(scratch_path(crash_dir, target));
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The file the safetensors target writes inputs to for the path-based reader.
fn scratch_path(crash_dir: &Path, target: Target) -> PathBuf {
    crash_dir.join(format!(".scratch-{}.safetensors", target.name()))
}

fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn save_finding(dir: &Path, target: Target, kind: &str, bytes: &[u8]) -> Result<PathBuf> {
    let ext = match target {
        Target::Ckpt => "ckpt",
        Target::Safetensors => "safetensors",
        _ => "json",
    };
    let path = dir.join(format!(
        "{}-{kind}-{:016x}.{ext}",
        target.name(),
        fnv64(bytes)
    ));
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

// ------------------------------------------------------------------------------ worker

static LAST_PANIC: Mutex<Option<(String, String)>> = Mutex::new(None);

fn limit_address_space(mb: u64) {
    let bytes = mb.saturating_mul(1 << 20) as libc::rlim_t;
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: setrlimit with a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } != 0 {
        eprintln!("fuzz: could not limit the address space; running without a limit");
    }
}

fn worker(opts: &Options, crash_dir: &Path) -> Result<i32> {
    let target = opts.target;
    limit_address_space(opts.memory_mb);
    panic::set_hook(Box::new(|info| {
        let loc = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some((msg, loc));
    }));
    let mut fz = Fuzzer::new(target, opts.seed)?;
    let current = crash_dir.join(format!(".current-{}", target.name()));
    let cur = std::fs::File::create(&current)?;
    let scratch = scratch_path(crash_dir, target);
    let limit = Duration::from_secs_f64(opts.seconds);
    let start = Instant::now();
    let mut beat = Instant::now();
    let mut inputs = 0u64;
    let mut locations = HashSet::new();
    let mut findings = 0usize;
    let stdout = std::io::stdout();
    while start.elapsed() < limit {
        let input = fz.next_input();
        cur.set_len(0)?;
        cur.write_all_at(&input.bytes, 0)?;
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            execute(target, &input.bytes, inputs, &scratch)
        }));
        inputs += 1;
        match outcome {
            Ok(sig) => fz.consider(sig, input),
            Err(_) => {
                let (msg, loc) = LAST_PANIC
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_default();
                if locations.insert(loc.clone()) {
                    findings += 1;
                    let saved = save_finding(crash_dir, target, "panic", &input.bytes)?;
                    let mut out = stdout.lock();
                    writeln!(
                        out,
                        "fuzz {}: PANIC `{msg}` at {loc}\n  input saved as {}\n  replay: cargo \
                         xtask fuzz --target {} --replay {}",
                        target.name(),
                        saved.display(),
                        target.name(),
                        saved.display()
                    )?;
                }
            }
        }
        if beat.elapsed() > Duration::from_millis(500) {
            beat = Instant::now();
            let mut out = stdout.lock();
            writeln!(out, "@@progress {inputs}")?;
            out.flush()?;
        }
    }
    let _ = std::fs::remove_file(&scratch);
    let mut out = stdout.lock();
    writeln!(out, "@@done {inputs} {findings} {}", fz.seen.len())?;
    out.flush()?;
    Ok(if findings > 0 { 3 } else { 0 })
}

fn replay(target: Target, path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let targets = if target == Target::All {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => vec![Target::Config],
            Some("safetensors") => vec![Target::Safetensors],
            _ => vec![Target::Ckpt],
        }
    } else {
        vec![target]
    };
    let scratch = std::env::temp_dir().join(format!("decorr-replay-{}", std::process::id()));
    for t in targets {
        let sig = execute(t, &bytes, 0, &scratch);
        println!("{}: {sig}", t.name());
    }
    let _ = std::fs::remove_file(&scratch);
    Ok(())
}

// ------------------------------------------------------------------------------ targets

/// An outcome class: "ok", or the error's wording without what it quotes (names, values from
/// the file), digits and non-ASCII, so that inputs giving a new class join the corpus.
fn outcome<T, E: std::fmt::Display>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => {
            let text = e.to_string();
            let quote = |c: char| c == '`' || c == '"';
            let (head, tail) = match (text.find(quote), text.rfind(quote)) {
                (Some(a), Some(b)) => (&text[..a], &text[b + 1..]),
                _ => (text.as_str(), ""),
            };
            let clean = |s: &str| -> String {
                s.chars()
                    .filter(|c| c.is_ascii() && !c.is_ascii_digit())
                    .take(60)
                    .collect()
            };
            format!("{}~{}", clean(head), clean(tail))
        }
    }
}

fn execute(target: Target, bytes: &[u8], n: u64, scratch: &Path) -> String {
    match target {
        Target::Ckpt => {
            let r = decorr_convert::ckpt::read_ckpt_bytes(bytes, Path::new("fuzz.ckpt"));
            outcome(&r)
        }
        Target::Safetensors => {
            let a = outcome(&decorr_convert::tensor::read_safetensors_bytes(
                bytes,
                Path::new("fuzz.safetensors"),
            ));
            let b = burn_store(bytes);
            // Through a file: every 16th input (it is written out first).
            let c = if n.is_multiple_of(16) && std::fs::write(scratch, bytes).is_ok() {
                outcome(&decorr_core::weights::read_tensors_f32(scratch))
            } else {
                String::new()
            };
            format!("{a} | {b} | {c}")
        }
        Target::Config => {
            let text = String::from_utf8_lossy(bytes);
            let unet = outcome(
                &serde_json::from_str::<decorr_unet::UNetConfig>(&text)
                    .map_err(|e| e.to_string())
                    .and_then(|c| c.validate().map_err(|e| e.to_string())),
            );
            let vae = outcome(
                &serde_json::from_str::<decorr_unet::VaeConfig>(&text)
                    .map_err(|e| e.to_string())
                    .and_then(|c| c.validate().map_err(|e| e.to_string())),
            );
            let clip = outcome(
                &serde_json::from_str::<decorr_clip::ClipTextConfig>(&text)
                    .map_err(|e| e.to_string())
                    .and_then(|c| c.validate().map_err(|e| e.to_string())),
            );
            let sched = decorr_scheduler::SchedulerConfig::from_json_str(&text).and_then(|c| {
                let kind = c.kind()?;
                for steps in [1, 50] {
                    decorr_scheduler::build(kind, &c, steps)?;
                }
                Ok(())
            });
            format!("{unet} | {vae} | {clip} | {}", outcome(&sched))
        }
        Target::All => unreachable!("split into targets"),
    }
}

/// What `load_safetensors` does with a file, short of a module: burn's store parses the header,
/// then each tensor's data is materialised.
fn burn_store(bytes: &[u8]) -> String {
    use burn::store::ModuleStore;
    let mut store = burn::store::SafetensorsStore::from_bytes(Some(bytes.to_vec()));
    match store.get_all_tensors() {
        Ok(tensors) => {
            let mut sig = "ok".to_string();
            for t in tensors.values() {
                if let Err(e) = burn::store::bridge::to_data(t) {
                    sig = outcome::<(), _>(&Err(e));
                }
            }
            sig
        }
        Err(e) => outcome::<(), _>(&Err(e)),
    }
}

// ------------------------------------------------------------------------------ mutation

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

#[derive(Clone)]
struct Input {
    bytes: Vec<u8>,
    /// The entries of a zip checkpoint, to mutate one and re-zip.
    zip: Option<Vec<(String, Vec<u8>)>>,
}

struct Fuzzer {
    target: Target,
    rng: Rng,
    corpus: Vec<Input>,
    seeds: usize,
    seen: HashSet<String>,
    /// JSON object keys met in the seeds (config target).
    keys: Vec<String>,
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    32,
    64,
    100,
    127,
    128,
    255,
    256,
    1000,
    1024,
    4096,
    32767,
    32768,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 48,
    1 << 60,
    1 << 62,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
    u64::MAX - 1,
];

/// Pickle fragments worth inserting (opcodes a state dict uses, memo traffic, huge lengths,
/// refused globals).
const PICKLE_TOKENS: &[&[u8]] = &[
    b"(",
    b"t",
    b")",
    b"]",
    b"}",
    b"a",
    b"e",
    b"s",
    b"u",
    b"R",
    b"Q",
    b"b",
    b".",
    b"N",
    b"\x88",
    b"\x85",
    b"\x86",
    b"\x87",
    b"\x94",
    b"h\x00",
    b"h\x01",
    b"h\x02",
    b"q\x00",
    b"q\x01",
    b"j\x00\x00\x00\x00",
    b"r\x00\x00\x00\x00",
    b"K\x00",
    b"K\xff",
    b"M\xff\xff",
    b"J\xff\xff\xff\xff",
    b"J\x00\x00\x00\x80",
    b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x10",
    b"\x8a\x01\xff",
    b"X\xff\xff\xff\xff",
    b"X\x00\x00\x00\x00",
    b"\x8c\xff",
    b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x8e\x00\x00\x00\x00\x00\x00\x00\x80",
    b"B\xff\xff\xff\x7f",
    b"\x95\xff\xff\xff\xff\xff\xff\xff\xff",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch._utils\n_rebuild_parameter\n",
    b"ccollections\nOrderedDict\n",
    b"ctorch\nFloatStorage\n",
    b"ctorch\nHalfStorage\n",
    b"cposix\nsystem\n",
    b"\x8c\x05torch\x8c\x0bLongStorage\x93",
    b"X\x07\x00\x00\x00storage",
    b"X\x01\x00\x00\x000",
    b"X\x03\x00\x00\x00cpu",
    b"I01\n",
    b"L12345678901234567890L\n",
    b"p0\n",
    b"g0\n",
    b"S'x'\n",
    b"V\n",
];

const JSON_TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"null",
    b"true",
    b"0",
    b"-1",
    b"1e999",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"18446744073709551616",
    b"99999999999",
    b"\\u0000",
    b"\\ud800",
    b"[[[[[[[[[[",
    b"]]]]]]]]]]",
];

const STRINGS: &[&str] = &[
    "",
    "x",
    "NaN",
    "inf",
    "-1",
    "1e400",
    "linear",
    "scaled_linear",
    "squaredcos_cap_v2",
    "silu",
    "gelu",
    "quick_gelu",
    "epsilon",
    "v_prediction",
    "sample",
    "leading",
    "trailing",
    "linspace",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "LMSDiscreteScheduler",
    "UNet2DConditionModel",
    "AutoencoderKL",
    "CLIPTextModel",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "UNetMidBlock2DCrossAttn",
    "DownEncoderBlock2D",
    "UpDecoderBlock2D",
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "U8",
    "BOOL",
    "F4",
    "F6_E2M3",
    "F8_E4M3",
    "F8_E5M2",
    "E8M0",
    "C64",
    "U64",
];

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn is_seed(target: Target, path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match target {
        Target::Ckpt => matches!(ext, "ckpt" | "pth" | "pt" | "bin"),
        Target::Safetensors => ext == "safetensors",
        Target::Config => name == "config.json" || name == "scheduler_config.json",
        Target::All => false,
    }
}

fn zip_entries(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).ok()?;
    let mut out = Vec::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i).ok()?;
        let mut b = Vec::new();
        f.read_to_end(&mut b).ok()?;
        out.push((f.name().to_string(), b));
    }
    Some(out)
}

fn build_zip(entries: &[(String, Vec<u8>)]) -> Option<Vec<u8>> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        w.start_file(name.as_str(), opts).ok()?;
        w.write_all(bytes).ok()?;
    }
    Some(w.finish().ok()?.into_inner())
}

fn collect_keys(v: &serde_json::Value, out: &mut HashSet<String>) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    out.insert(k.clone());
                    stack.push(x);
                }
            }
            serde_json::Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
}

impl Fuzzer {
    fn new(target: Target, seed: u64) -> Result<Self> {
        let fixtures = workspace_root().join("tests/fixtures");
        let mut files = Vec::new();
        walk(&fixtures, &mut files);
        let mut corpus = Vec::new();
        let mut keys = HashSet::new();
        for path in files.iter().filter(|p| is_seed(target, p)) {
            let bytes = std::fs::read(path)?;
            if target == Target::Config
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            {
                collect_keys(&v, &mut keys);
            }
            let zip = if target == Target::Ckpt && bytes.starts_with(b"PK") {
                zip_entries(&bytes)
            } else {
                None
            };
            corpus.push(Input { bytes, zip });
        }
        if corpus.is_empty() {
            bail!(
                "no seeds for target {} under {}",
                target.name(),
                fixtures.display()
            );
        }
        let mut keys: Vec<String> = keys.into_iter().collect();
        keys.sort();
        let target_salt = fnv64(target.name().as_bytes());
        Ok(Fuzzer {
            target,
            rng: Rng(seed ^ target_salt),
            seeds: corpus.len(),
            corpus,
            seen: HashSet::new(),
            keys,
        })
    }

    /// Keep an input whose outcome is new.
    fn consider(&mut self, sig: String, input: Input) {
        if !self.seen.contains(&sig) && std::env::var_os("DECORR_FUZZ_SHOW").is_some() {
            println!("new outcome: {sig}");
        }
        if self.seen.insert(sig)
            && self.corpus.len() < self.seeds + MAX_EXTRA_CORPUS
            && input.bytes.len() <= self.target.max_kept()
        {
            self.corpus.push(input);
        }
    }

    fn next_input(&mut self) -> Input {
        let i = self.rng.below(self.corpus.len());
        let base = self.corpus[i].clone();
        let mut input = self.mutate(base);
        if input.bytes.len() > self.target.max_input() {
            input.bytes.truncate(self.target.max_input());
            input.zip = None;
        }
        input
    }

    fn mutate(&mut self, base: Input) -> Input {
        match self.target {
            Target::Ckpt => self.mutate_ckpt(base),
            Target::Safetensors => Input {
                bytes: self.mutate_safetensors(base.bytes),
                zip: None,
            },
            Target::Config => Input {
                bytes: self.mutate_config(base.bytes),
                zip: None,
            },
            Target::All => unreachable!(),
        }
    }

    fn mutate_ckpt(&mut self, base: Input) -> Input {
        if let Some(mut entries) = base.zip.clone().filter(|e| !e.is_empty())
            && self.rng.chance(85)
        {
            let pkl = entries.iter().position(|(n, _)| n.ends_with("data.pkl"));
            let i = match pkl {
                Some(p) if self.rng.chance(75) => p,
                _ => self.rng.below(entries.len()),
            };
            match self.rng.below(20) {
                0 => {
                    // Drop an entry.
                    entries.remove(i);
                }
                1 => {
                    // Truncate a storage, or give it extra bytes.
                    let e = &mut entries[i].1;
                    let n = self.rng.below(e.len() + 1);
                    e.truncate(n);
                    if self.rng.chance(50) {
                        e.extend(std::iter::repeat_n(0u8, self.rng.below(64)));
                    }
                }
                _ => {
                    let mut data = std::mem::take(&mut entries[i].1);
                    self.havoc(&mut data, PICKLE_TOKENS);
                    entries[i].1 = data;
                }
            }
            let Some(mut bytes) = build_zip(&entries) else {
                return base;
            };
            if self.rng.chance(10) {
                self.havoc(&mut bytes, PICKLE_TOKENS);
                return Input { bytes, zip: None };
            }
            return Input {
                bytes,
                zip: Some(entries),
            };
        }
        let mut bytes = base.bytes;
        self.havoc(&mut bytes, PICKLE_TOKENS);
        Input { bytes, zip: None }
    }

    fn mutate_safetensors(&mut self, mut bytes: Vec<u8>) -> Vec<u8> {
        let header_len = bytes
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")) as usize)
            .filter(|&n| n <= bytes.len().saturating_sub(8));
        let Some(n) = header_len else {
            self.havoc(&mut bytes, JSON_TOKENS);
            return bytes;
        };
        let header = bytes[8..8 + n].to_vec();
        let data = bytes[8 + n..].to_vec();
        let roll = self.rng.below(10);
        let new_header = match roll {
            0..=5 => self.json_mutate(&header).unwrap_or_else(|| {
                let mut h = header.clone();
                self.havoc(&mut h, JSON_TOKENS);
                h
            }),
            6..=7 => {
                let mut h = header.clone();
                self.havoc(&mut h, JSON_TOKENS);
                h
            }
            _ => {
                self.havoc(&mut bytes, JSON_TOKENS);
                return bytes;
            }
        };
        let mut out = Vec::with_capacity(8 + new_header.len() + data.len());
        let len = if self.rng.chance(85) {
            new_header.len() as u64
        } else {
            *self.rng.pick(INTERESTING)
        };
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&new_header);
        out.extend_from_slice(&data);
        if self.rng.chance(10) {
            let cut = self.rng.below(out.len() + 1);
            out.truncate(cut);
        }
        out
    }

    fn mutate_config(&mut self, mut bytes: Vec<u8>) -> Vec<u8> {
        if self.rng.chance(75)
            && let Some(b) = self.json_mutate(&bytes)
        {
            bytes = b;
            if self.rng.chance(15) {
                self.havoc(&mut bytes, JSON_TOKENS);
            }
            return bytes;
        }
        self.havoc(&mut bytes, JSON_TOKENS);
        bytes
    }

    // ------------------------------------------------------------------ byte mutations

    /// 1 to 4 stacked byte-level mutations.
    fn havoc(&mut self, data: &mut Vec<u8>, tokens: &[&[u8]]) {
        let rounds = 1 + self.rng.below(4);
        for _ in 0..rounds {
            self.mutate_once(data, tokens);
        }
    }

    fn mutate_once(&mut self, data: &mut Vec<u8>, tokens: &[&[u8]]) {
        let len = data.len();
        match self.rng.below(12) {
            0 if len > 0 => {
                // Bit flips.
                for _ in 0..1 + self.rng.below(4) {
                    let i = self.rng.below(len);
                    data[i] ^= 1 << self.rng.below(8);
                }
            }
            1 if len > 0 => {
                let i = self.rng.below(len);
                data[i] = self.rng.next() as u8;
            }
            2 => {
                // Insert random bytes.
                let i = self.rng.below(len + 1);
                let n = 1 + self.rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| self.rng.next() as u8).collect();
                data.splice(i..i, bytes);
            }
            3 if len > 0 => {
                // Delete a range.
                let i = self.rng.below(len);
                let n = (1 + self.rng.below(64)).min(len - i);
                data.drain(i..i + n);
            }
            4 | 5 if len > 0 => {
                // Overwrite with an interesting integer.
                let width = *self.rng.pick(&[1usize, 2, 4, 8]);
                let v = *self.rng.pick(INTERESTING);
                let v = if self.rng.chance(20) {
                    v.wrapping_neg()
                } else {
                    v
                };
                let bytes = if self.rng.chance(20) {
                    v.to_be_bytes()[8 - width..].to_vec()
                } else {
                    v.to_le_bytes()[..width].to_vec()
                };
                let i = self.rng.below(len);
                let end = (i + width).min(len);
                data[i..end].copy_from_slice(&bytes[..end - i]);
            }
            6 if len > 0 => {
                // Small arithmetic on a byte.
                let i = self.rng.below(len);
                let d = 1 + self.rng.below(16) as u8;
                data[i] = if self.rng.chance(50) {
                    data[i].wrapping_add(d)
                } else {
                    data[i].wrapping_sub(d)
                };
            }
            7 => {
                // Insert a dictionary token.
                let t = *self.rng.pick(tokens);
                let i = self.rng.below(len + 1);
                data.splice(i..i, t.iter().copied());
            }
            8 if len > 0 => {
                // Duplicate a block, a few or many times (memo and nesting fan-out).
                let i = self.rng.below(len);
                let n = (1 + self.rng.below(32)).min(len - i);
                let block = data[i..i + n].to_vec();
                let times = *self.rng.pick(&[1usize, 2, 10, 100, 1000]);
                let at = self.rng.below(len + 1);
                let rep: Vec<u8> = block.iter().copied().cycle().take(n * times).collect();
                data.splice(at..at, rep);
            }
            9 => {
                // Splice with another corpus entry.
                let other = self.rng.below(self.corpus.len());
                let src = &self.corpus[other].bytes;
                if !src.is_empty() {
                    let i = self.rng.below(src.len());
                    let n = (1 + self.rng.below(256)).min(src.len() - i);
                    let chunk = src[i..i + n].to_vec();
                    let at = self.rng.below(len + 1);
                    if self.rng.chance(50) {
                        data.splice(at..at, chunk);
                    } else {
                        let end = (at + n).min(len);
                        data.splice(at..end, chunk);
                    }
                }
            }
            10 if len > 0 => {
                // Truncate.
                let n = self.rng.below(len);
                data.truncate(n);
            }
            _ if len > 1 => {
                // Copy a block within the input.
                let i = self.rng.below(len);
                let n = (1 + self.rng.below(64)).min(len - i);
                let block = data[i..i + n].to_vec();
                let at = self.rng.below(len - n + 1);
                data[at..at + n].copy_from_slice(&block);
            }
            _ => data.push(self.rng.next() as u8),
        }
    }

    // ------------------------------------------------------------------ JSON mutations

    fn interesting_json(&mut self) -> serde_json::Value {
        use serde_json::{Value, json};
        match self.rng.below(9) {
            0 | 1 => {
                let v = *self.rng.pick(INTERESTING);
                if self.rng.chance(25) {
                    json!(-(v.min(i64::MAX as u64) as i64))
                } else {
                    json!(v)
                }
            }
            2 => json!(*self.rng.pick(&[
                0.0f64,
                -0.0,
                0.5,
                -0.5,
                1e-300,
                1e-45,
                1e9,
                1e12,
                1e18,
                1e38,
                3.5e38,
                1e39,
                1e300,
                -1e300,
                -1e9,
                2.5,
                0.999_999_9,
                1.000_000_1,
            ])),
            // Placeholders written out as non-JSON or out-of-range literals (see json_mutate).
            3 => Value::String(
                (*self.rng.pick(&[
                    "@NaN",
                    "@Infinity",
                    "@-Infinity",
                    "@1e400",
                    "@-1e400",
                    "@18446744073709551616",
                    "@-9223372036854775809",
                    "@deep",
                ]))
                .to_string(),
            ),
            4 => {
                if self.rng.chance(10) {
                    Value::String("x".repeat(*self.rng.pick(&[1000usize, 100_000])))
                } else if !self.keys.is_empty() && self.rng.chance(30) {
                    Value::String(self.rng.pick(&self.keys).clone())
                } else {
                    Value::String((*self.rng.pick(STRINGS)).to_string())
                }
            }
            5 => (*self.rng.pick(&[
                Value::Null,
                Value::Bool(true),
                Value::Bool(false),
                json!([]),
                json!({}),
            ]))
            .clone(),
            _ => {
                // An array of interesting numbers.
                let n = *self.rng.pick(&[0usize, 1, 2, 3, 4, 5, 8, 100, 10_000]);
                let v = *self.rng.pick(INTERESTING);
                let x = if self.rng.chance(20) {
                    json!(-1)
                } else {
                    json!(v)
                };
                Value::Array(vec![x; n])
            }
        }
    }

    /// Parse, apply 1 to 3 structural mutations, write back (with the placeholders as
    /// literals); `None` when `text` is not JSON.
    fn json_mutate(&mut self, text: &[u8]) -> Option<Vec<u8>> {
        use serde_json::Value;
        let mut v: Value = serde_json::from_slice(text).ok()?;
        for _ in 0..1 + self.rng.below(3) {
            let paths = json_paths(&v);
            let path = self.rng.pick(&paths).clone();
            match self.rng.below(10) {
                0..=5 => {
                    let new = self.interesting_json();
                    if let Some(slot) = v.pointer_mut(&path) {
                        *slot = new;
                    }
                }
                6 | 7 => {
                    // Add a known key (to the root or an object on the path).
                    let key = if self.keys.is_empty() {
                        "x".to_string()
                    } else {
                        self.rng.pick(&self.keys).clone()
                    };
                    let new = self.interesting_json();
                    let target = if self.rng.chance(60) {
                        Some(&mut v)
                    } else {
                        v.pointer_mut(&path)
                    };
                    if let Some(Value::Object(m)) = target {
                        m.insert(key, new);
                    }
                }
                8 => {
                    // Drop a key.
                    if let Some((parent, last)) = path.rsplit_once('/')
                        && let Some(Value::Object(m)) = v.pointer_mut(parent)
                    {
                        m.remove(&unescape_pointer(last));
                    }
                }
                _ => {
                    // Resize an array.
                    if let Some(Value::Array(a)) = v.pointer_mut(&path) {
                        if a.is_empty() {
                            a.push(Value::from(1));
                        }
                        // At most about 1 MB of JSON (arrays of arrays would multiply).
                        let per_item = serde_json::to_string(&*a).map_or(1, |t| t.len()) / a.len();
                        let cap = (1 << 20) / per_item.max(1);
                        let n = (*self.rng.pick(&[0usize, 1, 2, 3, 5, 8, 100, 10_000])).min(cap);
                        let first = a.clone();
                        a.clear();
                        a.extend(first.iter().cycle().take(n).cloned());
                    }
                }
            }
        }
        let mut s = serde_json::to_string(&v).ok()?;
        if s.contains("\"@") {
            let deep = *self.rng.pick(&[100usize, 1000, 100_000]);
            for (from, to) in [
                ("\"@NaN\"", "NaN".to_string()),
                ("\"@Infinity\"", "Infinity".to_string()),
                ("\"@-Infinity\"", "-Infinity".to_string()),
                ("\"@1e400\"", "1e400".to_string()),
                ("\"@-1e400\"", "-1e400".to_string()),
                (
                    "\"@18446744073709551616\"",
                    "18446744073709551616".to_string(),
                ),
                (
                    "\"@-9223372036854775809\"",
                    "-9223372036854775809".to_string(),
                ),
                (
                    "\"@deep\"",
                    format!("{}{}", "[".repeat(deep), "]".repeat(deep)),
                ),
            ] {
                s = s.replace(from, &to);
            }
        }
        Some(s.into_bytes())
    }
}

fn escape_pointer(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

fn unescape_pointer(k: &str) -> String {
    k.replace("~1", "/").replace("~0", "~")
}

/// JSON pointers of every node (the root is "").
fn json_paths(v: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), v)];
    while let Some((p, v)) = stack.pop() {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    stack.push((format!("{p}/{}", escape_pointer(k)), x));
                }
            }
            serde_json::Value::Array(a) => {
                // Long arrays: a few of their elements.
                for (i, x) in a.iter().enumerate().take(16) {
                    stack.push((format!("{p}/{i}"), x));
                }
            }
            _ => {}
        }
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_json_stays_json_mostly() {
        let mut a = Fuzzer::new(Target::Config, 7).unwrap();
        let mut b = Fuzzer::new(Target::Config, 7).unwrap();
        let mut json_ok = 0;
        for _ in 0..200 {
            let x = a.next_input();
            assert_eq!(x.bytes, b.next_input().bytes);
            json_ok += serde_json::from_slice::<serde_json::Value>(&x.bytes).is_ok() as usize;
        }
        assert!(json_ok > 50, "{json_ok}");
    }

    #[test]
    fn ckpt_mutants_of_zip_seeds_are_zips() {
        let mut f = Fuzzer::new(Target::Ckpt, 1).unwrap();
        assert!(f.corpus.iter().any(|s| s.zip.is_some()));
        let zips = (0..50)
            .filter(|_| f.next_input().bytes.starts_with(b"PK"))
            .count();
        assert!(zips > 10, "{zips}");
    }
}
