//! `decorr study`: create (comparisons present in every run, images without metadata, refusals),
//! the JSON API's answers and refusals, durability across a killed server, concurrency without
//! lost or duplicated answers, blindness (nothing a rater can fetch names a method, a run folder
//! or a seed), and the report's numbers against the answers given.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

mod common;
use common::{assert_fails, decorr, text};
#[path = "common/study_support.rs"]
mod study_support;
use study_support::{StudyServer, create, create_args, token_of};

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
        let log = study.with_file_name(format!("serve-{host}.log"));
        let inner = StudyServer::start(study, host, log);
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
            for method in ["sd", "pag", "cfg", "decorrelated", "run-cfg", "run-pag"] {
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
    for f in ["report.md", "report.csv", "report.png"] {
        assert!(study.join(f).is_file(), "{f}");
    }
}
