//! `decorr study`: create (comparisons present in every run, images without metadata, refusals),
//! the JSON API's answers and refusals, durability across a killed server, concurrency without
//! lost or duplicated answers, blindness (nothing a rater can fetch names a method, a run folder
//! or a seed), and the report's numbers against the answers given; the server's limits (no
//! client holds a connection), CSV cells no spreadsheet runs, more than 26 methods, missing
//! image files, bounded count flags, and the study example of docs/commands/study.md as
//! written.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{assert_fails, decorr, text};
#[path = "common/study_support.rs"]
mod study_support;
use study_support::{StudyServer, create, create_args, renamed_run, token_of};

const PROMPTS: [&str; 2] = ["rusty tracks with an old train", "a cat with a hat"];

/// Runs of `sd` and `pag` of both prompts, seeds `first..first + n`.
fn make_runs(dir: &Path, first: u64, n: usize) -> Vec<PathBuf> {
    study_support::make_runs(dir, &PROMPTS, first, n)
}

/// A running `decorr study serve` with the tokens of its links.
struct Server {
    inner: StudyServer,
    base: String,
    /// (rater name, token)
    raters: Vec<(String, String)>,
    admin: String,
}

impl Server {
    fn start(study: &Path, host: &str) -> Server {
        Server::start_with(study, host, &[])
    }

    /// [`Server::start`] with more `serve` arguments.
    fn start_with(study: &Path, host: &str, extra: &[&str]) -> Server {
        let log = study.with_file_name(format!("serve-{host}.log"));
        let inner = StudyServer::start_with(study, host, log, extra);
        Server {
            base: inner.base.clone(),
            raters: inner
                .raters
                .iter()
                .map(|(name, url)| (name.clone(), token_of(url)))
                .collect(),
            admin: token_of(&inner.admin),
            inner,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> (u16, String) {
        let agent = agent();
        match agent.get(&self.url(path)).call() {
            Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    fn get_bytes(&self, path: &str) -> Vec<u8> {
        let mut r = agent().get(&self.url(path)).call().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        r.body_mut().read_to_vec().unwrap()
    }

    fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    fn post(&self, token: &str, body: &str) -> (u16, String) {
        let mut r = agent()
            .post(&self.url(&format!("/api/{token}/answer")))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    fn csv(&self) -> Vec<Vec<String>> {
        let (status, body) = self.get(&format!("/admin/{}/export.csv", self.admin));
        assert_eq!(status, 200);
        body.lines()
            .skip(1)
            .map(|l| l.split(',').map(str::to_string).collect())
            .collect()
    }
}

/// An agent that returns 4xx/5xx as responses, not errors.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// A full, valid answer for the comparison `next` gave, with scores `f(slot index)`.
fn answer_for(next: &Value, f: impl Fn(usize) -> (u8, u8)) -> String {
    let ratings: Vec<Value> = next["images"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, im)| {
            let (a, b) = f(i);
            json!({"slot": im["slot"], "alignment": a, "fidelity": b})
        })
        .collect();
    json!({"item": next["item"], "ratings": ratings}).to_string()
}

#[test]
fn create_picks_common_comparisons_and_strips_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = make_runs(tmp.path(), 0, 4);
    // A third run with fewer seeds: only the common ones are compared.
    let study = tmp.path().join("study");
    create(
        &runs,
        &study,
        &[
            "--seeds-per-prompt",
            "3",
            "--raters",
            "2",
            "--repeat",
            "2",
            "--seed",
            "7",
        ],
    );
    let images: Vec<PathBuf> = std::fs::read_dir(study.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    // 2 prompts x 3 seeds x 2 methods.
    assert_eq!(images.len(), 12);
    for p in &images {
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert!(
            info.uncompressed_latin1_text.is_empty()
                && info.compressed_latin1_text.is_empty()
                && info.utf8_text.is_empty(),
            "{} keeps text chunks",
            p.display()
        );
    }
    // The source PNGs do carry the method: the copy is what removed it.
    let src = runs[1].join("000-rusty-tracks-with-an-old-train/seed-000000.png");
    assert!(String::from_utf8_lossy(&std::fs::read(src).unwrap()).contains("pag"));

    // Refusals: an existing study, one run, two folders of the same method, no raters,
    // nothing in common.
    let refused = |runs: &[PathBuf], out: &Path, extra: &[&str], needles: &[&str]| {
        assert_fails(&create_args(runs, out, extra), needles);
    };
    let both = &runs[..2];
    refused(both, &study, &["--raters", "1"], &["already exists"]);
    let other = tmp.path().join("other");
    refused(
        &runs[..1],
        &other,
        &["--raters", "1"],
        &["at least two run folders"],
    );
    let same = tmp.path().join("same");
    let twice = [runs[0].clone(), runs[0].clone()];
    refused(
        &twice,
        &same,
        &["--raters", "1"],
        &["both hold method `sd`"],
    );
    refused(both, &other, &[], &["--raters"]);
    assert!(
        !other.exists() && !same.exists(),
        "a refused create leaves nothing"
    );
    let late = tmp.path().join("late");
    let late_runs = make_runs(&late, 100, 2);
    let apart = [runs[0].clone(), late_runs[1].clone()];
    refused(
        &apart,
        &other,
        &["--raters", "1"],
        &["no prompt and seed is present in every run"],
    );
}

#[test]
fn the_api_stores_valid_answers_once_and_refuses_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = make_runs(tmp.path(), 0, 2);
    let study = tmp.path().join("study");
    create(&runs, &study, &["--raters", "2"]);
    let s = Server::start(&study, "127.0.0.1");
    let (t1, t2) = (&s.raters[0].1, &s.raters[1].1);
    let next = s.json(&format!("/api/{t1}/next"));
    assert_eq!(
        (next["done"].as_u64(), next["total"].as_u64()),
        (Some(0), Some(4))
    );
    assert_eq!(next["position"], 1);
    let item = next["item"].as_str().unwrap();

    // Bad input: 4xx with a message, nothing stored.
    let other_item = s.json(&format!("/api/{t2}/next"))["item"].clone();
    let cases: Vec<(String, u16, &str)> = vec![
        (answer_for(&next, |_| (6, 3)), 422, "integer from 1 to 5"),
        (answer_for(&next, |_| (0, 3)), 422, "integer from 1 to 5"),
        (
            answer_for(&next, |_| (3, 3)).replace("\"alignment\":3", "\"alignment\":3.5"),
            422,
            "integer from 1 to 5",
        ),
        (
            answer_for(&next, |_| (3, 3)).replace("\"fidelity\":3", "\"fidelity\":\"3\""),
            422,
            "integer from 1 to 5",
        ),
        (
            json!({"item": item, "ratings": [{"slot": "A", "alignment": 3, "fidelity": 3}]})
                .to_string(),
            422,
            "missing: B",
        ),
        (
            json!({"item": item, "ratings": [
                {"slot": "A", "alignment": 3, "fidelity": 3},
                {"slot": "A", "alignment": 3, "fidelity": 3}]})
            .to_string(),
            422,
            "rated twice",
        ),
        (
            json!({"item": item, "ratings": [
                {"slot": "A", "alignment": 3, "fidelity": 3},
                {"slot": "Q", "alignment": 3, "fidelity": 3}]})
            .to_string(),
            422,
            "is not in this comparison",
        ),
        (
            json!({"item": other_item, "ratings": [
                {"slot": "A", "alignment": 3, "fidelity": 3},
                {"slot": "B", "alignment": 3, "fidelity": 3}]})
            .to_string(),
            404,
            "not one of this rater's",
        ),
        ("{\"item\": ".into(), 400, "must be JSON"),
        ("[1, 2]".into(), 400, "must be JSON"),
        (
            json!({"item": item, "ratings": [], "extra": "x".repeat(20_000)}).to_string(),
            413,
            "",
        ),
    ];
    for (body, status, needle) in &cases {
        let (got, text) = s.post(t1, body);
        assert_eq!(got, *status, "{body:.200}: {text}");
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    assert!(s.csv().is_empty(), "a refused answer stored something");

    // Unknown tokens: a plain 404 everywhere.
    for path in [
        "/api/0123456789abcdef0123456789abcdef/next".to_string(),
        "/rate/0123456789abcdef0123456789abcdef".into(),
        "/rate/../../etc/passwd".into(),
        format!("/admin/{t1}"),
        "/admin/0123456789abcdef0123456789abcdef/export.csv".into(),
    ] {
        let (status, body) = s.get(&path);
        assert_eq!((status, body.as_str()), (404, "not found"), "{path}");
    }
    let (status, _) = s.post(
        "0123456789abcdef0123456789abcdef",
        &answer_for(&next, |_| (3, 3)),
    );
    assert_eq!(status, 404);

    // A valid answer, then the same item re-sent: replaced, not added.
    let (status, body) = s.post(t1, &answer_for(&next, |i| (2 + i as u8, 4)));
    assert_eq!(status, 200, "{body}");
    let (status, _) = s.post(t1, &answer_for(&next, |i| (5 - i as u8, 1)));
    assert_eq!(status, 200);
    let rows = s.csv();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let scores: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r[7].as_str(), r[9].as_str(), r[10].as_str()))
        .collect();
    assert_eq!(scores, [("A", "5", "1"), ("B", "4", "1")]);
    // Going back shows them; next moves on.
    let back = s.json(&format!("/api/{t1}/item/1"));
    assert_eq!(back["ratings"][0]["alignment"], 5);
    let next2 = s.json(&format!("/api/{t1}/next"));
    assert_eq!(
        (next2["position"].as_u64(), next2["done"].as_u64()),
        (Some(2), Some(1))
    );
    let (status, _) = s.get(&format!("/api/{t1}/item/99"));
    assert_eq!(status, 404);
    // An image id that is none of the rater's is not served.
    let (status, _) = s.get(&format!("/img/{t1}/0123456789abcdef0123456789abcdef.png"));
    assert_eq!(status, 404);
}

#[test]
fn an_acknowledged_answer_survives_sigkill_and_the_rater_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = make_runs(tmp.path(), 0, 3);
    let study = tmp.path().join("study");
    create(
        &runs,
        &study,
        &["--rater", "ana", "--rater", "ben", "--repeat", "1"],
    );
    let mut s = Server::start(&study, "127.0.0.1");
    let token = s.raters[0].1.clone();
    let mut acknowledged = Vec::new();
    for k in 0..3 {
        let next = s.json(&format!("/api/{token}/next"));
        let (status, _) = s.post(&token, &answer_for(&next, |i| (1 + (k + i) as u8 % 5, 3)));
        assert_eq!(status, 200);
        acknowledged.push(next["item"].as_str().unwrap().to_string());
    }
    // SIGKILL: no shutdown, no flush.
    let pid = s.inner.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    let _ = s.inner.child.wait();
    drop(s);

    let s = Server::start(&study, "127.0.0.1");
    assert_eq!(
        s.raters[0],
        ("ana".to_string(), token.clone()),
        "same links"
    );
    let next = s.json(&format!("/api/{token}/next"));
    assert_eq!(
        (next["position"].as_u64(), next["done"].as_u64()),
        (Some(4), Some(3))
    );
    assert_eq!(next["total"], 7, "6 comparisons and 1 repeat");
    for (k, item) in acknowledged.iter().enumerate() {
        let t = s.json(&format!("/api/{token}/item/{}", k + 1));
        assert_eq!(t["item"].as_str(), Some(item.as_str()));
        assert_eq!(t["ratings"].as_array().unwrap().len(), 2);
    }
    assert_eq!(s.csv().len(), 6);
}

#[test]
fn concurrent_raters_lose_and_duplicate_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = make_runs(tmp.path(), 0, 6);
    let study = tmp.path().join("study");
    create(
        &runs,
        &study,
        &["--raters", "12", "--seeds-per-prompt", "6"],
    );
    let s = Server::start(&study, "127.0.0.1");
    std::thread::scope(|scope| {
        for (_, token) in &s.raters {
            let s = &s;
            scope.spawn(move || {
                loop {
                    let next = s.json(&format!("/api/{token}/next"));
                    if next["finished"] == true {
                        break;
                    }
                    let (status, body) = s.post(token, &answer_for(&next, |i| (1 + i as u8, 2)));
                    assert_eq!(status, 200, "{body}");
                }
            });
        }
    });
    let rows = s.csv();
    // 12 raters x 12 comparisons x 2 images, each (rater, item, slot) once.
    assert_eq!(rows.len(), 12 * 12 * 2);
    let keys: std::collections::BTreeSet<(String, String, String)> = rows
        .iter()
        .map(|r| (r[0].clone(), r[2].clone(), r[7].clone()))
        .collect();
    assert_eq!(keys.len(), rows.len());
    for (_, token) in &s.raters {
        let n = s.json(&format!("/api/{token}/next"));
        assert_eq!(
            (n["finished"].as_bool(), n["done"].as_u64()),
            (Some(true), Some(12))
        );
    }
}

#[test]
fn nothing_a_rater_fetches_names_a_method_a_folder_or_a_seed() {
    let tmp = tempfile::tempdir().unwrap();
    // Seeds far from small numbers, so a match means a leak.
    let runs = make_runs(tmp.path(), 73_519, 2);
    let study = tmp.path().join("study");
    create(&runs, &study, &["--raters", "1", "--repeat", "1"]);
    let s = Server::start(&study, "127.0.0.1");
    let token = &s.raters[0].1;
    let mut fetched: Vec<(String, Vec<u8>)> = Vec::new();
    let mut get = |path: String| {
        let body = s.get_bytes(&path);
        fetched.push((path, body));
    };
    get(format!("/rate/{token}"));
    for asset in ["rate.js", "style.css"] {
        get(format!("/assets/{asset}"));
    }
    get(format!("/api/{token}/next"));
    let total = s.json(&format!("/api/{token}/next"))["total"]
        .as_u64()
        .unwrap();
    let mut images = Vec::new();
    for k in 1..=total {
        let t = s.json(&format!("/api/{token}/item/{k}"));
        get(format!("/api/{token}/item/{k}"));
        for im in t["images"].as_array().unwrap() {
            images.push(im["url"].as_str().unwrap().to_string());
        }
    }
    for url in images {
        get(url);
    }
    let words = |text: &str| -> Vec<String> {
        text.split(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_')
            .map(str::to_lowercase)
            .collect()
    };
    let run_dirs: Vec<String> = runs.iter().map(|r| r.display().to_string()).collect();
    for (path, body) in &fetched {
        for text in [path.clone(), String::from_utf8_lossy(body).to_string()] {
            let w = words(&text);
            for method in [
                "sd",
                "pag",
                "cfg",
                "decorrelated",
                "ours",
                "run-cfg",
                "run-pag",
            ] {
                assert!(!w.iter().any(|x| x == method), "{path} names `{method}`");
            }
            for seed in ["73519", "73520", "073519", "073520"] {
                assert!(
                    !w.iter().any(|x| x.contains(seed)),
                    "{path} holds seed {seed}"
                );
            }
            for dir in &run_dirs {
                assert!(!text.contains(dir.as_str()), "{path} names {dir}");
            }
            assert!(!text.contains("seed-0"), "{path} names an image file");
        }
        if path.ends_with(".png") {
            assert!(
                !body
                    .windows(4)
                    .any(|w| w == b"tEXt" || w == b"iTXt" || w == b"zTXt"),
                "{path} has text chunks"
            );
        }
    }
}

#[test]
fn serve_warns_off_loopback_and_report_matches_the_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = make_runs(tmp.path(), 0, 3);
    let study = tmp.path().join("study");
    create(&runs, &study, &["--raters", "3", "--repeat", "2"]);
    let s = Server::start(&study, "0.0.0.0");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = s.inner.log();
    assert!(log.contains("warning") && log.contains("0.0.0.0"), "{log}");
    // Every rater answers everything: slot scores depend on the method shown, so the table's
    // means are known. The method behind a slot comes from the admin CSV.
    for (_, token) in &s.raters {
        loop {
            let next = s.json(&format!("/api/{token}/next"));
            if next["finished"] == true {
                break;
            }
            let (status, _) = s.post(token, &answer_for(&next, |i| (3 + i as u8, 2 + i as u8)));
            assert_eq!(status, 200);
        }
    }
    let rows = s.csv();
    drop(s);
    let o = decorr(&["study", "report", study.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("| sd |") && text(&o).contains("| pag |"),
        "{}",
        text(&o)
    );
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("report.json")).unwrap()).unwrap();
    for method in ["sd", "pag"] {
        // First showings of this method, from the export.
        let xs: Vec<f64> = rows
            .iter()
            .filter(|r| r[6] == "0" && r[8] == method)
            .map(|r| r[9].parse().unwrap())
            .collect();
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let got = &r["methods"][method]["alignment"];
        assert_eq!(got["n"].as_u64(), Some(18), "6 comparisons x 3 raters");
        assert!((got["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
        assert!((got["std"].as_f64().unwrap() - std).abs() < 1e-12);
        let [lo, hi] = [
            got["ci95"][0].as_f64().unwrap(),
            got["ci95"][1].as_f64().unwrap(),
        ];
        assert!(lo <= mean && mean <= hi);
        assert_eq!(r["methods"][method]["raters"], 3);
    }
    assert!(r["wilcoxon"]["pag"]["alignment"]["p_value"].is_number());
    assert_eq!(
        r["consistency"]["rater-01"]["pairs"], 4,
        "2 repeats x 2 images"
    );
    // Slot scores do not depend on the method, so each rater agrees with themselves only
    // where the placement repeated; the figure is a share.
    let exact = r["consistency"]["rater-01"]["exact"]["alignment"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&exact));
    for f in ["report.md", "report.csv", "report.svg", "report.png"] {
        assert!(study.join(f).is_file(), "{f}");
    }
}

/// The export's rows as a spreadsheet reads them (quoted cells, `""` inside), header first.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut cell) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cell)),
            (false, '\n') => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => cell.push(c),
        }
    }
    rows
}

/// Whether a spreadsheet would run the cell as a formula.
fn live_formula(cell: &str) -> bool {
    cell.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

/// Reads `s` until the server closes it (EOF or reset), returning what came and when; `None`
/// when it was still open after `wait`.
fn read_until_closed(s: &mut TcpStream, wait: Duration) -> Option<(Vec<u8>, Instant)> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some((got, Instant::now())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(_) => return Some((got, Instant::now())),
        }
    }
}

#[test]
fn serve_closes_silent_half_sent_idle_and_slow_connections_and_bounds_their_number() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = make_runs(tmp.path(), 0, 1);
    let study = tmp.path().join("study");
    create(&runs, &study, &["--raters", "1"]);
    // Short bounds: 1 s for headers (and idle keep-alive), 1 s per request, 3 connections.
    let s = Server::start_with(
        &study,
        "127.0.0.1",
        &[
            "--header-timeout",
            "1",
            "--request-timeout",
            "1",
            "--max-connections",
            "3",
        ],
    );
    let addr = s.base.trim_start_matches("http://").to_string();
    let connect = || TcpStream::connect(&addr).unwrap();
    // Well past the 1 s bound, far below "never".
    let wait = Duration::from_secs(6);
    let opened = Instant::now();
    let mut silent = connect();
    let mut half = connect();
    half.write_all(b"GET /assets/style.css HTTP/1.1\r\nHost: x\r\nAccept: ")
        .unwrap();
    let mut third = connect();
    // A fourth while three are open: told the server is busy, and closed at once.
    let mut fourth = connect();
    let (busy, _) = read_until_closed(&mut fourth, wait).expect("the 4th connection stays open");
    let busy = String::from_utf8_lossy(&busy);
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    assert!(
        opened.elapsed() < Duration::from_millis(900),
        "503 took {:?}",
        opened.elapsed()
    );
    for (what, conn) in [
        ("silent", &mut silent),
        ("half-sent", &mut half),
        ("third", &mut third),
    ] {
        let (got, at) = read_until_closed(conn, wait)
            .unwrap_or_else(|| panic!("a {what} connection was still open after {wait:?}"));
        let took = at - opened;
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{what}: closed after {took:?}, the bound is 1 s"
        );
        assert!(
            !String::from_utf8_lossy(&got).contains(" 200 "),
            "{what} was answered"
        );
    }

    // Idle after a response (keep-alive): closed after the same bound.
    let mut idle = connect();
    idle.write_all(b"GET /assets/style.css HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let asked = Instant::now();
    let (got, at) = read_until_closed(&mut idle, wait)
        .unwrap_or_else(|| panic!("an idle keep-alive connection was still open after {wait:?}"));
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got:.200}");
    assert!(
        !got.to_lowercase().contains("connection: close"),
        "{got:.300}"
    );
    assert!(
        at - asked < Duration::from_secs(4),
        "idle for {:?}",
        at - asked
    );

    // A body sent too slowly: 408 within the request bound.
    let mut slow = connect();
    let token = &s.raters[0].1;
    slow.write_all(
        format!(
            "POST /api/{token}/answer HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
             content-length: 100\r\n\r\n{{\"item\": "
        )
        .as_bytes(),
    )
    .unwrap();
    let sent = Instant::now();
    let (got, at) = read_until_closed(&mut slow, wait)
        .unwrap_or_else(|| panic!("a slow body held its connection past {wait:?}"));
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got:.300}");
    assert!(
        at - sent < Duration::from_secs(4),
        "slow body for {:?}",
        at - sent
    );

    // And the server still serves.
    let next = s.json(&format!("/api/{token}/next"));
    assert_eq!(next["position"], 1);
    assert!(s.csv().is_empty(), "the slow body stored something");
}

#[test]
fn csv_cells_that_a_spreadsheet_would_run_are_exported_as_text() {
    let tmp = tempfile::tempdir().unwrap();
    // A prompt, a rater and a method name that a spreadsheet would run as formulas.
    let prompt = "=1+1 a cat with a hat";
    let runs = study_support::make_runs(tmp.path(), &[prompt], 0, 1);
    let method = "@SUM(1+1)";
    let renamed = tmp.path().join("run-at");
    renamed_run(&runs[1], &renamed, method);
    let rater = "=HYPERLINK(\"http://x\",\"y\")";
    let study = tmp.path().join("study");
    create(
        &[runs[0].clone(), renamed],
        &study,
        &["--rater", rater, "--rater", "+cmd", "--rater=-x\tz"],
    );
    let s = Server::start(&study, "127.0.0.1");
    for (_, token) in &s.raters {
        let next = s.json(&format!("/api/{token}/next"));
        let (status, body) = s.post(token, &answer_for(&next, |_| (3, 4)));
        assert_eq!(status, 200, "{body}");
    }
    let (status, export) = s.get(&format!("/admin/{}/export.csv", s.admin));
    assert_eq!(status, 200);
    drop(s);
    let rows = parse_csv(&export);
    assert_eq!(rows.len(), 1 + 3 * 2, "{export}");
    for row in &rows {
        assert_eq!(row.len(), rows[0].len(), "{row:?}");
        for cell in row {
            assert!(!live_formula(cell), "a live formula {cell:?} in\n{export}");
        }
    }
    // The text is all there, behind the quote mark.
    let column = |name: &str| rows[0].iter().position(|c| c == name).unwrap();
    let cells = |name: &str| -> std::collections::BTreeSet<String> {
        rows[1..].iter().map(|r| r[column(name)].clone()).collect()
    };
    assert_eq!(
        cells("rater"),
        [format!("'{rater}"), "'+cmd".into(), "'-x\tz".into()].into()
    );
    assert_eq!(cells("prompt"), [format!("'{prompt}")].into());
    assert_eq!(
        cells("method"),
        ["sd".to_string(), format!("'{method}")].into()
    );

    // The report's CSV too.
    let o = decorr(&[
        "study",
        "report",
        study.to_str().unwrap(),
        "--resamples",
        "100",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let report = std::fs::read_to_string(study.join("report.csv")).unwrap();
    let rows = parse_csv(&report);
    assert_eq!(rows.len(), 3, "{report}");
    assert!(rows.iter().flatten().all(|c| !live_formula(c)), "{report}");
    assert_eq!(rows[2][0], format!("'{method}"));
}

#[test]
fn a_study_of_more_than_26_methods_names_its_slots_beyond_z_and_can_be_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = study_support::make_runs(tmp.path(), &[PROMPTS[0]], 0, 1);
    let methods: Vec<String> = (1..=28).map(|k| format!("method{k:02}")).collect();
    let many: Vec<PathBuf> = methods
        .iter()
        .map(|m| {
            let dir = tmp.path().join(m);
            renamed_run(&runs[0], &dir, m);
            dir
        })
        .collect();
    let study = tmp.path().join("study");
    create(&many, &study, &["--raters", "1"]);
    let s = Server::start(&study, "127.0.0.1");
    let token = &s.raters[0].1;
    let next = s.json(&format!("/api/{token}/next"));
    let slots: Vec<&str> = next["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|im| im["slot"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = ('A'..='Z')
        .map(String::from)
        .chain(["AA".into(), "AB".into()])
        .collect();
    assert_eq!(slots, expected);
    // A slot past the last is refused, naming the slots; a full answer is taken.
    let wrong = answer_for(&next, |_| (3, 3)).replace("\"AB\"", "\"AC\"");
    let (status, body) = s.post(token, &wrong);
    assert_eq!(status, 422, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    let error = error["error"].as_str().unwrap();
    assert!(
        error.contains("\"AC\" is not in this comparison") && error.ends_with("Z, AA, AB)"),
        "{error}"
    );
    let (status, body) = s.post(token, &answer_for(&next, |i| (1 + (i % 5) as u8, 2)));
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.json(&format!("/api/{token}/next"))["finished"], true);
    let rows = s.csv();
    assert_eq!(rows.len(), 28);
    let by_slot: std::collections::BTreeMap<&str, &str> = rows
        .iter()
        .map(|r| (r[7].as_str(), r[8].as_str()))
        .collect();
    assert_eq!(by_slot.len(), 28, "one row per slot: {rows:?}");
    assert!(by_slot.contains_key("AA") && by_slot.contains_key("AB"));
    let shown: std::collections::BTreeSet<&str> = by_slot.values().copied().collect();
    assert_eq!(shown.len(), 28, "every method once");
    drop(s);
    let o = decorr(&[
        "study",
        "report",
        study.to_str().unwrap(),
        "--resamples",
        "100",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("report.json")).unwrap()).unwrap();
    for m in &methods {
        assert_eq!(r["methods"][m]["alignment"]["n"], 1, "{m}");
    }
}

#[test]
fn serve_refuses_a_study_with_missing_images_and_names_one_that_vanishes() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = make_runs(tmp.path(), 0, 1);
    let study = tmp.path().join("study");
    create(&runs, &study, &["--raters", "1"]);
    let images: Vec<PathBuf> = std::fs::read_dir(study.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(images.len(), 4);

    // Missing at start: refused before listening, naming the file.
    let gone = &images[0];
    let kept = std::fs::read(gone).unwrap();
    std::fs::remove_file(gone).unwrap();
    let args = ["study", "serve", study.to_str().unwrap(), "--port", "0"];
    let name = gone.file_name().unwrap().to_str().unwrap();
    assert_fails(
        &args,
        &["1 of the study's 4 images are missing", name, "restore"],
    );
    let o = decorr(&args);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("serving"),
        "{}",
        text(&o)
    );
    std::fs::write(gone, kept).unwrap();

    // Removed while serving: a 404 with a message for the rater, the path in the log.
    let s = Server::start(&study, "127.0.0.1");
    let token = &s.raters[0].1;
    let next = s.json(&format!("/api/{token}/next"));
    let url = next["images"][0]["url"].as_str().unwrap();
    assert_eq!(s.get_bytes(url)[..4], *b"\x89PNG");
    let file = study.join("images").join(url.rsplit('/').next().unwrap());
    std::fs::remove_file(&file).unwrap();
    let (status, body) = s.get(url);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("image is missing"), "{body}");
    assert!(
        !body.contains(study.to_str().unwrap()),
        "the path is the server's: {body}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.inner.log().contains(file.to_str().unwrap()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = s.inner.log();
    assert!(
        log.contains(file.to_str().unwrap()) && log.contains("missing"),
        "{log}"
    );
    // The rest goes on.
    let (status, body) = s.post(token, &answer_for(&next, |_| (3, 3)));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn count_flags_are_bounded_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = [tmp.path().join("a"), tmp.path().join("b")];
    let out = tmp.path().join("study");
    let refused = |extra: &[&str], needles: &[&str]| {
        let started = Instant::now();
        assert_fails(&create_args(&runs, &out, extra), needles);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{extra:?} took long"
        );
    };
    refused(
        &["--raters", "18446744073709551615"],
        &["--raters", "10000"],
    );
    refused(&["--raters", "100000000"], &["--raters", "10000"]);
    refused(
        &["--raters", "99999999999999999999999"],
        &["--raters", "10000"],
    );
    refused(&["--raters", "0"], &["--raters", "1 to 10000"]);
    refused(&["--raters=-3"], &["--raters", "whole number"]);
    refused(&["--raters", "many"], &["--raters", "whole number"]);
    refused(
        &["--raters", "2", "--prompts-per-pair", "0"],
        &["--prompts-per-pair", "1 to 1000000"],
    );
    refused(
        &[
            "--raters",
            "2",
            "--seeds-per-prompt",
            "18446744073709551615",
        ],
        &["--seeds-per-prompt", "1000000"],
    );
    refused(
        &["--raters", "2", "--repeat", "100000000000"],
        &["--repeat", "1000000"],
    );
    assert!(!out.exists());
    let study = out.to_str().unwrap();
    for (flag, value, bound) in [
        ("--resamples", "100000000000", "1000000"),
        ("--resamples", "0", "1 to 1000000"),
    ] {
        assert_fails(&["study", "report", study, flag, value], &[flag, bound]);
    }
    for (flag, value, bound) in [
        ("--max-connections", "0", "1 to 100000"),
        ("--max-connections", "18446744073709551616", "100000"),
        ("--header-timeout", "0", "1 to 3600"),
        ("--request-timeout", "99999999999", "3600"),
    ] {
        assert_fails(&["study", "serve", study, flag, value], &[flag, bound]);
    }
}

/// The `decorr study` page of the user docs (docs/commands/study.md), whose first `sh` block
/// is the example these tests run.
fn readme_study_section() -> String {
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/commands/study.md");
    let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
    assert!(
        text.starts_with("# `decorr study`"),
        "docs/commands/study.md is the `decorr study` page"
    );
    text
}

/// The study page's example commands (its `sh` block), continuation lines joined, comments apart.
fn readme_example(section: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the study section has a sh block");
    let (mut comments, mut commands) = (Vec::new(), Vec::new());
    let mut line = String::new();
    for l in block.lines() {
        let l = l.trim();
        if l.starts_with('#') {
            comments.push(l.trim_start_matches('#').trim().to_string());
            continue;
        }
        let l = l.split(" # ").next().unwrap().trim();
        if let Some(l) = l.strip_suffix('\\') {
            line.push_str(l);
            continue;
        }
        line.push_str(l);
        if !line.trim().is_empty() {
            commands.push(line.split_whitespace().map(str::to_string).collect());
        }
        line.clear();
    }
    (comments, commands)
}

#[test]
fn the_readme_study_example_makes_the_comparisons_it_states() {
    let section = readme_study_section();
    let (comments, commands) = readme_example(&section);
    let comment = comments.join(" ");
    // "... `decorr compare --pairs FILE ... --out cmp` ...: A pairs x B prompt x C seeds = N
    // comparisons"
    let words: Vec<&str> = comment
        .split(|c: char| c.is_whitespace() || c == '`' || c == '(' || c == ')' || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    let at = words
        .iter()
        .position(|w| *w == "comparisons")
        .unwrap_or_else(|| panic!("no `N comparisons` in the example's comment: {comment}"));
    let num = |i: usize| -> usize {
        words[i]
            .parse()
            .unwrap_or_else(|_| panic!("{:?} in {comment:?} is not a number", words[i]))
    };
    let n = num(at - 1);
    assert_eq!(words[at - 2], "=", "{comment}");
    let (pairs, prompts, seeds) = (num(at - 10), num(at - 7), num(at - 4));
    let [pairs_word, x1, prompts_word, x2, seeds_word] =
        [at - 9, at - 8, at - 6, at - 5, at - 3].map(|i| words[i]);
    assert!(
        pairs_word.starts_with("pair")
            && prompts_word.starts_with("prompt")
            && seeds_word.starts_with("seed")
            && [x1, x2] == ["x", "x"],
        "expected `A pairs x B prompts x C seeds = N comparisons` in {comment:?}"
    );
    assert_eq!(
        pairs * prompts * seeds,
        n,
        "the study page's own product: {comment}"
    );
    let pairs_file = words[words.iter().position(|w| *w == "--pairs").expect("--pairs") + 1];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let listed = std::fs::read_to_string(root.join(pairs_file)).unwrap();
    let listed = listed
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .count();
    assert_eq!(
        listed, pairs,
        "{pairs_file} has {listed} pairs; the study page says {pairs}"
    );

    // `decorr compare` on the study page's pairs with its default seeds, on the tiny models and
    // cheap settings (the count depends on the pairs and seeds only).
    let work = tempfile::tempdir().unwrap();
    let cmp = work.path().join("cmp");
    let sd_tiny = root.join("assets/sd-tiny");
    let o = decorr(&[
        "compare",
        "--pairs",
        root.join(pairs_file).to_str().unwrap(),
        "--weights",
        sd_tiny.to_str().unwrap(),
        "--steps",
        "1",
        "--scheduler",
        "ddim",
        "--width",
        "16",
        "--height",
        "16",
        "--layer",
        "1",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--lr",
        "1e-3",
        "--excite-attn-res",
        "8",
        "--quiet",
        "--out",
        cmp.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    // The study page's commands, with its folders in the work folder.
    let local = |arg: &str| -> String {
        if arg == "study" || arg.starts_with("cmp/") {
            work.path().join(arg).to_str().unwrap().to_string()
        } else {
            arg.to_string()
        }
    };
    let run = |command: &[String]| {
        assert_eq!(command[0], "decorr", "{command:?}");
        let args: Vec<String> = command[1..]
            .iter()
            .enumerate()
            .map(|(i, a)| if i < 2 { a.clone() } else { local(a) })
            .collect();
        decorr(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let of = |verb: &str| {
        commands
            .iter()
            .find(|c| c.len() > 2 && c[1] == "study" && c[2] == verb)
            .unwrap_or_else(|| panic!("no `decorr study {verb}` in the study page's example"))
    };
    let create = of("create");
    let o = run(create);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!(": {n} comparisons of 4 methods")),
        "the study page says {n} comparisons:\n{out}"
    );
    assert!(
        !out.contains("note:"),
        "the study page's example gets fewer than it asks for:\n{out}"
    );

    // Served, each rater has the comparisons and the repeats.
    let repeat: u64 = create[create.iter().position(|a| a == "--repeat").unwrap() + 1]
        .parse()
        .unwrap();
    let study = work.path().join("study");
    let s = Server::start(&study, "127.0.0.1");
    assert_eq!(s.raters.len(), 3);
    for (_, token) in &s.raters {
        let next = s.json(&format!("/api/{token}/next"));
        assert_eq!(next["total"].as_u64(), Some(n as u64 + repeat));
    }
    drop(s);
    assert_eq!(of("serve")[3], "study", "the study page serves its study");
    let o = run(of("report"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(study.join("report.md").is_file());
}
