//! A running `decorr study serve STUDY --port 0` for the study's tests and load benchmark: its
//! address, rater links and admin link as it prints them, killed and reaped on drop.
#![allow(dead_code)] // each user takes a different subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

/// A link's last path segment: a rater's or the admin's token.
pub fn token_of(url: &str) -> String {
    url.rsplit('/').next().unwrap_or_default().to_string()
}
