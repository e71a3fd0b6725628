//! What the study's tests and load benchmark share: run folders of two methods made by `decorr
//! generate` on the tiny models, `decorr study create` over them, and a running `decorr study
//! serve STUDY --port 0` (its address, rater links and admin link as it prints them, killed and
//! reaped on drop).
#![allow(dead_code)] // each user takes a different subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `decorr ARGS`, which must succeed.
fn decorr_ok(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_decorr"))
        .args(args)
        .output()
        .expect("run decorr");
    assert!(
        o.status.success(),
        "decorr {args:?}:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs of two methods (`sd` with CFG, `pag`) on the tiny models into `dir/run-cfg` and
/// `dir/run-pag`: every prompt, seeds `first..first + n`, one DDIM step.
pub fn make_runs(dir: &Path, prompts: &[&str], first: u64, n: usize) -> Vec<PathBuf> {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/sd-tiny");
    let (first, n) = (first.to_string(), n.to_string());
    ["cfg", "pag"]
        .iter()
        .map(|g| {
            let out = dir.join(format!("run-{g}"));
            let mut args = vec!["generate", "--weights", model.to_str().unwrap()];
            for p in prompts {
                args.extend(["--prompt", p]);
            }
            args.extend(["--steps", "1", "--scheduler", "ddim", "--seed", &first]);
            args.extend(["--num-images", &n, "--guidance", g, "--quiet"]);
            args.extend(["--out", out.to_str().unwrap()]);
            decorr_ok(&args);
            out
        })
        .collect()
}

/// The arguments of `decorr study create --runs RUNS --out OUT EXTRA`.
pub fn create_args<'a>(runs: &'a [PathBuf], out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["study", "create", "--runs"];
    args.extend(runs.iter().map(|r| r.to_str().unwrap()));
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    args
}

/// `decorr study create`, which must succeed.
pub fn create(runs: &[PathBuf], out: &Path, extra: &[&str]) {
    decorr_ok(&create_args(runs, out, extra));
}

pub struct StudyServer {
    pub child: Child,
    /// Its stderr.
    pub log: PathBuf,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// (rater name, full rating URL), as printed.
    pub raters: Vec<(String, String)>,
    /// The admin page's full URL.
    pub admin: String,
}

impl StudyServer {
    /// Starts the server on `host` and a free port, stderr to `log`; fails after a minute
    /// without its links.
    pub fn start(study: &Path, host: &str, log: PathBuf) -> StudyServer {
        Self::start_with(study, host, log, &[])
    }

    /// [`StudyServer::start`] with more `serve` arguments (its limits).
    pub fn start_with(study: &Path, host: &str, log: PathBuf, extra: &[&str]) -> StudyServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_decorr"))
            .args([
                "study",
                "serve",
                study.to_str().unwrap(),
                "--port",
                "0",
                "--host",
                host,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start decorr study serve");
        let stdout = child.stdout.take().unwrap();
        // Lines on a thread, so that a server that prints nothing fails instead of hanging.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = StudyServer {
            child,
            log,
            base: String::new(),
            raters: Vec::new(),
            admin: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.admin.is_empty() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| {
                    panic!("`decorr study serve` printed no links:\n{}", server.log())
                });
            if server.base.is_empty() {
                server.base = line
                    .split_whitespace()
                    .find(|w| w.starts_with("http://"))
                    .unwrap_or_else(|| panic!("no address in {line:?}"))
                    .to_string();
                continue;
            }
            let (name, url) = line.trim().split_once(": ").expect("NAME: URL");
            if name == "admin" {
                server.admin = url.to_string();
            } else {
                server.raters.push((name.to_string(), url.to_string()));
            }
        }
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for StudyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the run folder `src` (a `decorr generate --out`) at `dst` whose manifests name
/// `method` instead: another method's run for tests that need many, without generating them.
pub fn renamed_run(src: &Path, dst: &Path, method: &str) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (from, to) = (e.path(), dst.join(e.file_name()));
        if from.is_dir() {
            renamed_run(&from, &to, method);
        } else if e.file_name() == "manifest.json" {
            let mut m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&from).unwrap()).unwrap();
            for image in m["images"].as_array_mut().unwrap() {
                image["method"] = method.into();
            }
            std::fs::write(&to, m.to_string()).unwrap();
        } else if !e.file_name().to_string_lossy().starts_with(".decorr") {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

/// A link's last path segment: a rater's or the admin's token.
pub fn token_of(url: &str) -> String {
    url.rsplit('/').next().unwrap_or_default().to_string()
}
