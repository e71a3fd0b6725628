//! Benchmark (not a test): the study server under 50 simulated raters answering 60 comparisons
//! each, concurrently, on loopback. Prints the median and p99 latency of `GET next` and of
//! `POST answer` (each answer committed to SQLite with a full sync before the reply), the
//! throughput, and checks that no answer was lost or duplicated.
//! `cargo bench -p decorr-cli --bench study_load [-- RATERS COMPARISONS]`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "../tests/common/study_support.rs"]
mod study_support;
use study_support::{StudyServer, create, make_runs, token_of};

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

fn main() {
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let raters = nums.first().copied().unwrap_or(50);
    let comparisons = nums.get(1).copied().unwrap_or(60);
    let prompts = [
        "rusty tracks with an old train",
        "a cat with a hat",
        "a dog on a sofa",
    ];
    let seeds = comparisons.div_ceil(prompts.len());
    let tmp = tempfile::tempdir().unwrap();
    let runs = make_runs(tmp.path(), &prompts, 0, seeds);
    let study = tmp.path().join("study");
    let (r, s) = (raters.to_string(), seeds.to_string());
    create(&runs, &study, &["--raters", &r, "--seeds-per-prompt", &s]);
    let server = StudyServer::start(&study, "127.0.0.1", tmp.path().join("serve.log"));
    let base = server.base.clone();
    let tokens: Vec<String> = server.raters.iter().map(|(_, url)| token_of(url)).collect();
    let admin = token_of(&server.admin);
    let total = (comparisons / prompts.len() * prompts.len()).max(seeds * prompts.len());
    println!(
        "{raters} raters x {total} comparisons (2 images each), concurrently, loopback, SQLite WAL \
         + synchronous=FULL"
    );
    let started = Instant::now();
    let (mut gets, mut posts) = (Vec::new(), Vec::new());
    std::thread::scope(|scope| {
        let handles: Vec<_> = tokens
            .iter()
            .map(|token| {
                let base = &base;
                scope.spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
                    let (mut g, mut p) = (Vec::new(), Vec::new());
                    loop {
                        let t = Instant::now();
                        let next: Value = agent
                            .get(&format!("{base}/api/{token}/next"))
                            .call()
                            .unwrap()
                            .body_mut()
                            .read_json()
                            .unwrap();
                        g.push(t.elapsed());
                        if next["finished"] == true {
                            break;
                        }
                        let ratings: Vec<Value> = next["images"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|im| json!({"slot": im["slot"], "alignment": 4, "fidelity": 3}))
                            .collect();
                        let body = json!({"item": next["item"], "ratings": ratings}).to_string();
                        let t = Instant::now();
                        agent
                            .post(&format!("{base}/api/{token}/answer"))
                            .header("content-type", "application/json")
                            .send(&body)
                            .unwrap();
                        p.push(t.elapsed());
                    }
                    (g, p)
                })
            })
            .collect();
        for h in handles {
            let (g, p) = h.join().unwrap();
            gets.extend(g);
            posts.extend(p);
        }
    });
    let wall = started.elapsed().as_secs_f64();
    let csv = ureq::get(&format!("{base}/admin/{admin}/export.csv"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    let keys: std::collections::BTreeSet<(String, String, String)> = rows
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].into(), f[2].into(), f[7].into())
        })
        .collect();
    drop(server);
    println!(
        "answers: {} posted, {} rows stored, {} distinct (rater, comparison, slot): {}",
        posts.len(),
        rows.len(),
        keys.len(),
        if rows.len() == posts.len() * 2 && keys.len() == rows.len() {
            "none lost or duplicated"
        } else {
            "MISMATCH"
        }
    );
    let n = posts.len();
    println!(
        "POST answer: median {:.2} ms, p99 {:.2} ms; GET next: median {:.2} ms, p99 {:.2} ms; \
         {:.0} answers/s over {wall:.1} s",
        pct(&mut posts, 0.5),
        pct(&mut posts, 0.99),
        pct(&mut gets, 0.5),
        pct(&mut gets, 0.99),
        n as f64 / wall
    );
}
