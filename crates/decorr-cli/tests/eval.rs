//! `decorr eval` end to end on a small synthetic evaluation: two tiny-SD runs (pre-trained CFG
//! and the decorrelated guidance), a scripted VLM server on loopback, the tiny BERT of the
//! BERTScore fixtures. Checks the report's numbers against what the scripted answers imply,
//! resume through the VLM cache (by counting requests), and that shards merge to the same report.
//! Metric parity with bert_score / pytorch-fid is tested in decorr-eval.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use common::{PROMPT, assert_fails, decorr, fixtures, quick_generate, text, tiny_sd};

/// Generates `method` images (seeds 0..3) into `dir`.
fn generate(model: &Path, dir: &Path, decorrelated: bool) {
    let enc = fixtures().join("pipeline/tuned_text_encoder");
    let extra = if decorrelated {
        vec!["--encoder", enc.to_str().unwrap()]
    } else {
        vec![]
    };
    let o = quick_generate(model, dir, &extra);
    assert!(o.status.success(), "{}", text(&o));
}

/// A chat-completions server that answers from the image it is sent: images of the `sd` run get
/// a caption without the train and "No" to the train question; `decorrelated` ones get the prompt
/// itself as caption and "Yes". Counts requests.
struct Vlm {
    url: String,
    requests: Arc<AtomicUsize>,
}

fn start_vlm(images: HashMap<String, &'static str>) -> Vlm {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", server.server_addr().to_ip().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    let images = Arc::new(Mutex::new(images));
    std::thread::spawn(move || {
        for mut req in server.incoming_requests() {
            count.fetch_add(1, Ordering::SeqCst);
            let mut body = String::new();
            req.as_reader().read_to_string(&mut body).unwrap();
            let method = images
                .lock()
                .unwrap()
                .iter()
                .find(|(b64, _)| body.contains(b64.as_str()))
                .map(|(_, m)| *m);
            let answer = match method {
                None => "unknown image".to_string(),
                Some(m) if body.contains("Is there") => {
                    if body.contains("a train") && m == "sd" {
                        "No.".into()
                    } else {
                        "Yes, there is.".into()
                    }
                }
                Some("sd") => "rusty tracks in a field".into(),
                Some(_) => PROMPT.to_string(),
            };
            let reply = serde_json::json!({
                "choices": [{"message": {"role": "assistant", "content": answer}}]
            });
            let _ = req.respond(
                tiny_http::Response::from_string(reply.to_string()).with_header(
                    "Content-Type: application/json"
                        .parse::<tiny_http::Header>()
                        .unwrap(),
                ),
            );
        }
    });
    Vlm { url, requests }
}

fn b64_of_images(dir: &Path, method: &'static str, into: &mut HashMap<String, &'static str>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png") {
            let b = std::fs::read(&p).unwrap();
            into.insert(base64::engine::general_purpose::STANDARD.encode(b), method);
        }
    }
}

fn csv_rows(path: &Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let head: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines
        .map(|l| {
            head.iter()
                .cloned()
                .zip(l.split(',').map(|c| c.trim_matches('"').to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn eval_run_reports_table_3_resumes_and_merges_shards() {
    let model = tiny_sd();
    let work = tempfile::tempdir().unwrap();
    let (sd, dec) = (work.path().join("sd"), work.path().join("dec"));
    generate(model.path(), &sd, false);
    generate(model.path(), &dec, true);
    let mut images = HashMap::new();
    b64_of_images(&sd, "sd", &mut images);
    b64_of_images(&dec, "ours", &mut images);
    let vlm = start_vlm(images);
    let bert = fixtures().join("bertscore/bert_tiny");
    let out = work.path().join("eval");
    let run = |out: &PathBuf, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "run",
            "--runs",
            sd.to_str().unwrap(),
            dec.to_str().unwrap(),
            "--captioner",
            &vlm.url,
            "--captioner-model",
            "test-vlm",
            "--objects",
            "tracks,train",
            "--bertscore-model",
            bert.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        decorr(&args)
    };
    let o = run(&out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    // 6 captions + 6 x 2 questions.
    assert_eq!(vlm.requests.load(Ordering::SeqCst), 18);
    for f in [
        "report.md",
        "report.csv",
        "report.json",
        "report.svg",
        "report.png",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let rows = csv_rows(&out.join("report.csv"));
    let row = |m: &str| {
        rows.iter()
            .find(|r| r["method"] == m && r["table"] == "overall")
            .unwrap()
    };
    let (s, d) = (row("sd"), row("ours"));
    assert_eq!(s["images"], "3");
    // The scripted VLM never sees the train in SD's images and always in ours.
    assert_eq!(
        (s["omission_rate"].as_str(), s["omission_missing"].as_str()),
        ("1", "3")
    );
    assert_eq!(
        (
            d["omission_rate"].as_str(),
            d["omission_clear_answers"].as_str()
        ),
        ("0", "3")
    );
    assert_eq!(d["both_present"], "1");
    // A caption equal to the prompt has recall 1; the train-less caption less.
    let rd: f64 = d["bertscore_recall_mean"].parse().unwrap();
    let rs: f64 = s["bertscore_recall_mean"].parse().unwrap();
    assert!((rd - 1.0).abs() < 1e-5, "{rd}");
    assert!(rs < 0.99, "{rs}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| sd | 3 |") && md.contains("100.0% (3/3;"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["images"].as_array().unwrap().len(), 6);
    assert_eq!(json["images"][0]["caption"], "rusty tracks in a field");

    // Resume: the same command again asks nothing.
    let o = run(&out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        vlm.requests.load(Ordering::SeqCst),
        18,
        "answers come from the cache"
    );

    // Shards: merge refuses until both are there, then gives the same table.
    let sharded = work.path().join("sharded");
    let o = run(&sharded, &["--shard", "1/2"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&sharded, &["--merge"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("run shard(s) 0 of 2 first"),
        "{}",
        text(&o)
    );
    let o = run(&sharded, &["--shard", "0/2"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&sharded, &["--merge"]);
    assert!(o.status.success(), "{}", text(&o));
    let a = csv_rows(&out.join("report.csv"));
    let b = csv_rows(&sharded.join("report.csv"));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for (k, v) in x {
            match (v.parse::<f64>(), y[k].parse::<f64>()) {
                (Ok(p), Ok(q)) => {
                    assert!((p - q).abs() <= 1e-6 * p.abs().max(1.0), "{k}: {p} vs {q}")
                }
                _ => assert_eq!(v, &y[k], "{k}"),
            }
        }
    }
}

#[test]
fn eval_errors_name_the_problem() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let empty = w.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_fails(
        &[
            "eval",
            "run",
            "--runs",
            empty.to_str().unwrap(),
            "--out",
            w.join("o").to_str().unwrap(),
        ],
        &["no manifest.json", "decorr generate"],
    );
    // Unreachable endpoint: a port nobody listens on.
    let model = tiny_sd();
    let run = w.join("run");
    generate(model.path(), &run, false);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let bert = fixtures().join("bertscore/bert_tiny");
    assert_fails(
        &[
            "eval",
            "run",
            "--runs",
            run.to_str().unwrap(),
            "--captioner",
            &url,
            "--bertscore-model",
            bert.to_str().unwrap(),
            "--timeout",
            "2",
            "--out",
            w.join("o2").to_str().unwrap(),
        ],
        &[&url, "server running"],
    );
    assert_fails(
        &[
            "eval",
            "run",
            "--runs",
            run.to_str().unwrap(),
            "--objects",
            "train",
            "--out",
            w.join("o3").to_str().unwrap(),
        ],
        &["--objects takes two objects"],
    );
    // FID: missing reference folder.
    assert_fails(
        &[
            "eval",
            "fid",
            "--inception",
            "nope.pth",
            "--real",
            w.join("missing").to_str().unwrap(),
            "--fake",
            run.to_str().unwrap(),
            "--json",
            w.join("f.json").to_str().unwrap(),
        ],
        &["missing", "neither a folder of images nor an .npz"],
    );
    // bertscore: malformed pairs file.
    let pairs = w.join("pairs.jsonl");
    std::fs::write(&pairs, "{\"candidate\": \"a\"}\n").unwrap();
    assert_fails(
        &[
            "eval",
            "bertscore",
            "--model",
            bert.to_str().unwrap(),
            "--pairs",
            pairs.to_str().unwrap(),
            "--json",
            w.join("b.json").to_str().unwrap(),
        ],
        &["line 1", "candidate"],
    );
    assert!(!w.join("b.json").exists());
}

/// Runs `decorr eval bertscore` on the fixture's sentence pairs (`cands`/`refs` of `fx`) and
/// checks every pair's P/R/F against bert_score's (`expected`, columns P, R, F) within 1e-5.
fn check_bertscore(
    model: &Path,
    fx: &serde_json::Value,
    layer: &str,
    extra: &[&str],
    expected: &serde_json::Value,
) {
    let work = tempfile::tempdir().unwrap();
    let pairs = work.path().join("pairs.jsonl");
    let mut lines = String::new();
    for (c, r) in fx["cands"]
        .as_array()
        .unwrap()
        .iter()
        .zip(fx["refs"].as_array().unwrap())
    {
        lines += &serde_json::json!({"candidate": c, "reference": r}).to_string();
        lines.push('\n');
    }
    std::fs::write(&pairs, lines).unwrap();
    let json = work.path().join("out.json");
    let mut args = vec![
        "eval",
        "bertscore",
        "--model",
        model.to_str().unwrap(),
        "--layer",
        layer,
        "--pairs",
        pairs.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = decorr(&args);
    assert!(o.status.success(), "{extra:?}: {}", text(&o));
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for (key, col) in [("precision", "P"), ("recall", "R"), ("f1", "F")] {
        for (k, want) in expected[col].as_array().unwrap().iter().enumerate() {
            let got = ours["pairs"][k][key].as_f64().unwrap();
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-5,
                "{extra:?} pair {k} {key}: {got} vs {want}"
            );
        }
    }
}

/// `eval bertscore` on the tiny BERT gives bert_score's numbers (fixture from
/// tests/pyref/make_bertscore_fixtures.py), with idf on and a baseline too.
#[test]
fn eval_bertscore_matches_bert_score() {
    let f = fixtures().join("bertscore");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("tiny_scores.json")).unwrap())
            .unwrap();
    let (model, layer) = (f.join("bert_tiny"), fx["layer"].to_string());
    let baseline = f.join("tiny_baseline.tsv");
    check_bertscore(&model, &fx, &layer, &[], &fx["idf_off"]);
    check_bertscore(&model, &fx, &layer, &["--idf"], &fx["idf_on"]);
    check_bertscore(
        &model,
        &fx,
        &layer,
        &["--baseline", baseline.to_str().unwrap()],
        &fx["rescaled"],
    );
}

/// `eval bertscore` with the tiny DeBERTa (xlarge-mnli's switches) gives bert_score's numbers
/// (fixture from tests/pyref/make_deberta_fixtures.py): the model type is read from config.json.
#[test]
fn eval_bertscore_runs_deberta_like_bert_score() {
    let f = fixtures().join("deberta");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("reference.json")).unwrap()).unwrap();
    let b = &fx["bertscore"];
    assert!(
        !b["idf"].as_bool().unwrap(),
        "the fixture is recorded without idf"
    );
    check_bertscore(&f.join("tiny"), b, &b["num_layers"].to_string(), &[], b);
}

/// `eval fid` on pytorch-fid-written statistics gives pytorch-fid's distance (fixture from
/// tests/pyref/make_fid_fixtures.py), and `--save-real-stats` writes a file that reads back equal.
#[test]
fn eval_fid_on_saved_statistics_matches_pytorch_fid() {
    let f = fixtures().join("fid");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("reference.json")).unwrap()).unwrap();
    let work = tempfile::tempdir().unwrap();
    for (tag, key) in [("a", "fid_a"), ("b", "fid_b")] {
        let json = work.path().join(format!("{tag}.json"));
        let saved = work.path().join(format!("{tag}-saved.npz"));
        let real = f.join(format!("{tag}1.npz"));
        let fake = f.join(format!("{tag}2.npz"));
        let o = decorr(&[
            "eval",
            "fid",
            "--real",
            real.to_str().unwrap(),
            "--fake",
            fake.to_str().unwrap(),
            "--save-real-stats",
            saved.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let ours: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let (got, want) = (ours["fid"].as_f64().unwrap(), fx[key].as_f64().unwrap());
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "{tag}: {got} vs {want}"
        );
        let a = decorr_eval_stats(&saved);
        let b = decorr_eval_stats(&real);
        assert_eq!(a, b, "saved statistics differ from the input");
    }
}

fn decorr_eval_stats(p: &Path) -> (Vec<f64>, Vec<f64>) {
    let s = decorr_eval::npz::read_stats(p).unwrap();
    (s.mu, s.sigma)
}

/// Writes the FID network with its deterministic stand-in weights as safetensors (the real
/// pytorch-fid file cannot be committed).
fn synthetic_inception(path: &Path) {
    use decorr_eval::inception::{synthetic_weight, weight_shapes};
    let shapes = weight_shapes();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let v = synthetic_weight(k, name, shape);
            (
                name.clone(),
                shape.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// `eval run --reference-images`: FID per method against a reference folder. The reference is
/// a copy of the SD run's images, so SD's FID is ~0 and the decorrelated run's is larger; the
/// distance equals what `eval fid` gives for the same two folders.
#[test]
fn eval_run_computes_fid_per_method() {
    let model = tiny_sd();
    let work = tempfile::tempdir().unwrap();
    let (sd, dec, reference) = (
        work.path().join("sd"),
        work.path().join("dec"),
        work.path().join("reference"),
    );
    generate(model.path(), &sd, false);
    generate(model.path(), &dec, true);
    std::fs::create_dir_all(&reference).unwrap();
    for e in std::fs::read_dir(&sd).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png") {
            std::fs::copy(&p, reference.join(p.file_name().unwrap())).unwrap();
        }
    }
    let weights = work.path().join("inception.safetensors");
    synthetic_inception(&weights);
    let out = work.path().join("eval");
    let o = decorr(&[
        "eval",
        "run",
        "--runs",
        sd.to_str().unwrap(),
        dec.to_str().unwrap(),
        "--reference-images",
        reference.to_str().unwrap(),
        "--inception",
        weights.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let rows = csv_rows(&out.join("report.csv"));
    let fid = |m: &str| -> f64 {
        rows.iter()
            .find(|r| r["method"] == m && r["table"] == "overall")
            .unwrap()["fid"]
            .parse()
            .unwrap()
    };
    let (f_sd, f_dec) = (fid("sd"), fid("ours"));
    assert!(
        f_sd.abs() < 1e-3 * f_dec,
        "SD against its own images: {f_sd} (ours {f_dec})"
    );
    assert!(f_dec > 0.0);
    assert!(
        out.join("reference-stats.npz").is_file(),
        "reference statistics are kept"
    );
    // No captions asked for: BERTScore and omission are n/a, not zero.
    assert_eq!(rows[0]["bertscore_recall_mean"], "");
    let json = work.path().join("fid.json");
    // `eval fid` on the run folder (no --attention-maps figures in it: every PNG is a sample).
    let o = decorr(&[
        "eval",
        "fid",
        "--inception",
        weights.to_str().unwrap(),
        "--real",
        out.join("reference-stats.npz").to_str().unwrap(),
        "--fake",
        dec.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let direct = v["fid"].as_f64().unwrap();
    assert!(
        (direct - f_dec).abs() <= 1e-4 * f_dec,
        "{direct} vs {f_dec}"
    );
}

/// Runs `decorr` with `RUST_LOG=info`, so log lines are checked too.
fn decorr_logged(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_decorr"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_LOG", "info")
        .output()
        .expect("run decorr")
}

/// Copies the run folder `from` to `to`.
fn copy_run(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// A manifest (written by whoever made the folder) may only name files inside its own folder:
/// absolute paths, `..` and symbolic links leading out are refused, naming the manifest, the
/// entry and the rule, before anything is read or written.
#[test]
fn eval_run_reads_only_files_inside_the_manifests_folder() {
    let model = tiny_sd();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let good = w.join("good");
    generate(model.path(), &good, false);
    std::fs::write(w.join("secret.png"), "not an image of the run").unwrap();
    let set_first = |dir: &Path, file: &str| {
        let m = dir.join("manifest.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&m).unwrap()).unwrap();
        v["images"][0]["file"] = file.into();
        std::fs::write(&m, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    };
    let mut cases = vec![
        ("absolute", "/etc/hostname", "absolute path"),
        ("dotdot", "../../x.png", "`..` component"),
        ("inner-dotdot", "sub/../../secret.png", "`..` component"),
    ];
    if cfg!(unix) {
        cases.push(("symlink", "seed-000000.png", "outside"));
    }
    for (name, entry, why) in cases {
        let dir = w.join(name);
        copy_run(&good, &dir);
        set_first(&dir, entry);
        #[cfg(unix)]
        if name == "symlink" {
            std::fs::remove_file(dir.join("seed-000000.png")).unwrap();
            std::os::unix::fs::symlink(w.join("secret.png"), dir.join("seed-000000.png")).unwrap();
        }
        let out = w.join(format!("out-{name}"));
        let manifest = dir.join("manifest.json");
        assert_fails(
            &[
                "eval",
                "run",
                "--runs",
                dir.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            &[
                manifest.to_str().unwrap(),
                entry,
                why,
                "may only name files inside its own folder",
            ],
        );
        assert!(!out.exists(), "{name}: nothing written");
    }
    // `generate --merge` refuses a shard manifest with such an entry too (it would copy it into
    // manifest.json).
    let sharded = w.join("sharded");
    copy_run(&good, &sharded);
    std::fs::rename(
        sharded.join("manifest.json"),
        sharded.join("manifest.shard-0-of-1.json"),
    )
    .unwrap();
    let shard = sharded.join("manifest.shard-0-of-1.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&shard).unwrap()).unwrap();
    v["images"][0]["file"] = "/etc/hostname".into();
    std::fs::write(&shard, v.to_string()).unwrap();
    let o = quick_generate(model.path(), &sharded, &["--merge"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("manifest.shard-0-of-1.json") && t.contains("/etc/hostname"),
        "{t}"
    );
    assert!(!sharded.join("manifest.json").exists());
}

/// Files that start with a UTF-8 byte-order mark (Windows editors write one) are read: the
/// manifest, `--captions`, `--objects-file`, `--pairs`. A captioner URL with credentials never
/// shows them: not in errors, logs or the report.
#[test]
fn bom_files_are_read_and_captioner_credentials_never_shown() {
    const BOM: &str = "\u{feff}";
    let model = tiny_sd();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let run = w.join("run");
    generate(model.path(), &run, false);
    let manifest = run.join("manifest.json");
    let m = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, format!("{BOM}{m}")).unwrap();
    let captions = w.join("captions.jsonl");
    let mut c = BOM.to_string();
    for s in 0..3 {
        c += &format!("{{\"image\": \"seed-{s:06}.png\", \"caption\": \"rusty tracks\"}}\n");
    }
    std::fs::write(&captions, c).unwrap();
    let objects = w.join("objects.json");
    std::fs::write(
        &objects,
        format!("{BOM}{{\"{PROMPT}\": [\"tracks\", \"train\"]}}"),
    )
    .unwrap();
    let vlm = start_vlm(HashMap::new());
    let secret_url = vlm.url.replace("http://", "http://alice:s3cret@");
    let bert = fixtures().join("bertscore/bert_tiny");
    let out = w.join("eval");
    let o = decorr_logged(&[
        "eval",
        "run",
        "--runs",
        run.to_str().unwrap(),
        "--captions",
        captions.to_str().unwrap(),
        "--objects-file",
        objects.to_str().unwrap(),
        "--captioner",
        &secret_url,
        "--captioner-model",
        "test-vlm",
        "--bertscore-model",
        bert.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("alice:***@"), "the redacted URL is shown: {t}");
    // 3 images x 2 questions; the captions came from the file.
    assert_eq!(vlm.requests.load(Ordering::SeqCst), 6);
    assert!(!t.contains("s3cret"), "{t}");
    for f in std::fs::read_dir(&out).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains("s3cret"),
                "{} holds the password",
                p.display()
            );
        }
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["settings"]["captioner"],
        secret_url.replace("s3cret", "***")
    );
    // Unreachable endpoint with credentials: the error names the redacted URL only.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://bob:hunter2@127.0.0.1:{port}/v1");
    let o = decorr_logged(&[
        "eval",
        "run",
        "--runs",
        run.to_str().unwrap(),
        "--captioner",
        &dead,
        "--bertscore-model",
        bert.to_str().unwrap(),
        "--timeout",
        "2",
        "--out",
        w.join("o2").to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("bob:***@127.0.0.1") && t.contains("server running"),
        "{t}"
    );
    assert!(!t.contains("hunter2"), "{t}");
    // A non-http URL is refused without echoing its password either.
    let o = decorr(&[
        "eval",
        "run",
        "--runs",
        run.to_str().unwrap(),
        "--captioner",
        "ftp://carol:pw123@host/v1",
        "--out",
        w.join("o3").to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("carol:***@"), "{t}");
    assert!(!t.contains("pw123"), "{t}");
    // `eval bertscore --pairs` with a BOM.
    let pairs = w.join("pairs.jsonl");
    std::fs::write(
        &pairs,
        format!("{BOM}{{\"candidate\": \"a train\", \"reference\": \"an old train\"}}\n"),
    )
    .unwrap();
    let json = w.join("b.json");
    let o = decorr(&[
        "eval",
        "bertscore",
        "--model",
        bert.to_str().unwrap(),
        "--pairs",
        pairs.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(json.is_file());
}
