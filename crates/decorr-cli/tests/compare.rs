//! `decorr compare` end to end on the tiny models (2 DDIM steps, 2 seeds, 16x16): every
//! method's folder and manifest, ours' encoders, the grids and the page; resume; a changed
//! setting refused; shards that merge to the unsharded result; and `decorr eval run` on the
//! method folders giving one report row per method.

mod common;

use std::path::{Path, PathBuf};

use common::{PROMPT, assert_fails, decorr, fixtures, text};

fn sd_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/sd-tiny")
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

const CUBE: &str = "a red cube on a blue ball";
const FOLDERS: [&str; 2] = [
    "000-rusty-tracks-with-an-old-train",
    "001-a-red-cube-on-a-blue-ball",
];

fn pairs_file(dir: &Path) -> PathBuf {
    let f = dir.join("pairs.jsonl");
    std::fs::write(
        &f,
        format!(
            "# prompts and their objects (the second goes missing)\n\
             {{\"prompt\": \"{PROMPT}\", \"objects\": [\"tracks\", \"train\"]}}\n\n\
             {{\"prompt\": \"{CUBE}\", \"objects\": [\"cube\", \"ball\"]}}\n"
        ),
    )
    .unwrap();
    f
}

fn compare(pairs: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let w = sd_tiny();
    let mut args = vec![
        "compare",
        "--weights",
        w.to_str().unwrap(),
        "--pairs",
        pairs.to_str().unwrap(),
        "--seeds",
        "0..2",
        "--steps",
        "2",
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
        "2",
        "--lr",
        "1e-3",
        "--excite-attn-res",
        "8",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    decorr(&args)
}

#[test]
fn compare_makes_every_method_on_the_same_seeds_resumes_and_shards() {
    let work = tempfile::tempdir().unwrap();
    let pairs = pairs_file(work.path());
    let out = work.path().join("cmp");
    let o = compare(&pairs, &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    for (method, recorded) in [
        ("sd", "sd"),
        ("pag", "pag"),
        ("aae", "aae"),
        ("ours", "ours"),
    ] {
        for folder in FOLDERS {
            let dir = out.join(method).join(folder);
            for f in ["seed-000000.png", "seed-000001.png", "manifest.json"] {
                assert!(dir.join(f).is_file(), "{method}/{folder}/{f} missing");
            }
            let m = json(&dir.join("manifest.json"));
            assert_eq!(m["images"][0]["method"], recorded, "{method}");
            assert_eq!(m["images"][1]["seed"], 1);
            assert_eq!(m["images"][0]["width"], 16);
        }
    }
    // Attend-and-Excite excites each prompt's pair; ours has one encoder per prompt.
    let aae = |f: &str| json(&out.join("aae").join(f).join("manifest.json"))["images"][0].clone();
    assert_eq!(
        aae(FOLDERS[0])["excite"]["token_indices"],
        serde_json::json!([2, 6])
    );
    assert_eq!(
        aae(FOLDERS[1])["excite"]["token_indices"],
        serde_json::json!([3, 7])
    );
    assert!(
        out.join("aae")
            .join(FOLDERS[0])
            .join("excite-000001.json")
            .is_file()
    );
    let sha = |f: &str| {
        json(&out.join("ours").join(f).join("manifest.json"))["images"][0]["encoder_sha256"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(sha(FOLDERS[0]), sha(FOLDERS[1]));
    for f in FOLDERS {
        let enc = out.join("encoders").join(f);
        assert!(enc.join("text_encoder/model.safetensors").is_file());
        assert_eq!(json(&enc.join("report.json"))["finished"], true);
        assert!(out.join("grids").join(format!("{f}.png")).is_file());
    }
    // Rows = methods, columns = seeds: 4 rows of cells of at least 128 px.
    let grid = image::open(out.join("grids").join(format!("{}.png", FOLDERS[1]))).unwrap();
    assert!(
        grid.height() > 4 * 128 && grid.width() > 2 * 128,
        "{grid:?}"
    );
    let objects = json(&out.join("objects.json"));
    assert_eq!(objects[PROMPT], serde_json::json!(["tracks", "train"]));
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    for needle in [
        "grids/000-rusty-tracks-with-an-old-train.png",
        "ours/001-a-red-cube-on-a-blue-ball/seed-000001.png",
        "encoders/001-a-red-cube-on-a-blue-ball/losses.png",
        "Attend-and-Excite",
        "decorr eval run --runs sd pag aae ours",
    ] {
        assert!(html.contains(needle), "{needle} missing in index.html");
    }
    // Each image is shown once: the grid picture is linked, not shown beside the table.
    assert!(!html.contains("<img class=\"grid\""), "{html}");
    assert_eq!(
        html.matches("<img src=\"ours/001-a-red-cube-on-a-blue-ball/seed-000001.png\"")
            .count(),
        1
    );
    // The same seeds, other methods: the images differ.
    let px = |m: &str| {
        image::open(out.join(m).join(FOLDERS[0]).join("seed-000000.png"))
            .unwrap()
            .to_rgb8()
    };
    assert_ne!(px("sd"), px("pag"));
    assert_ne!(px("sd"), px("ours"));

    // Resume: nothing made again, the encoders reused.
    let o = compare(&pairs, &out, &[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("reusing") && t.contains("2 of 2 images already there"),
        "{t}"
    );
    // Another setting is refused before anything changes, naming it.
    assert_fails(
        &[
            "compare",
            "--weights",
            sd_tiny().to_str().unwrap(),
            "--pairs",
            pairs.to_str().unwrap(),
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ],
        &["other settings", "steps: 2 there, 3 now"],
    );

    // Two shards and a merge give the same folders as the unsharded run.
    let sharded = work.path().join("sharded");
    let o = compare(&pairs, &sharded, &["--shard", "1/2"]);
    assert!(o.status.success(), "{}", text(&o));
    // Shard 1 of 2 owns the baselines' odd items and ours of prompt 1 only.
    assert!(
        sharded
            .join("sd")
            .join(FOLDERS[0])
            .join("seed-000001.png")
            .is_file()
    );
    assert!(
        !sharded
            .join("sd")
            .join(FOLDERS[0])
            .join("seed-000000.png")
            .exists()
    );
    assert!(!sharded.join("encoders").join(FOLDERS[0]).exists());
    assert!(
        sharded
            .join("ours")
            .join(FOLDERS[1])
            .join("seed-000000.png")
            .is_file()
    );
    let o = compare(&pairs, &sharded, &["--merge"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("8 of 16 images are missing") && t.contains("rerun shard(s) 0 of 2"),
        "{t}"
    );
    assert!(
        !sharded.join("index.html").exists(),
        "nothing written on failure"
    );
    let o = compare(&pairs, &sharded, &["--shard", "0/2"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = compare(&pairs, &sharded, &["--merge"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(sharded.join("index.html").is_file());
    for method in ["sd", "pag", "aae", "ours"] {
        for f in FOLDERS {
            let (a, b) = (sharded.join(method).join(f), out.join(method).join(f));
            // Equal but for the encoder file's SHA-256: burn writes the safetensors header's
            // metadata in hash-map order, so two trainings to the same weights differ there.
            let strip = |mut m: serde_json::Value| {
                for i in m["images"].as_array_mut().unwrap() {
                    i.as_object_mut().unwrap().remove("encoder_sha256");
                }
                m
            };
            assert_eq!(
                strip(json(&a.join("manifest.json"))),
                strip(json(&b.join("manifest.json"))),
                "{method}/{f}"
            );
            for seed in ["seed-000000.png", "seed-000001.png"] {
                assert_eq!(
                    image::open(a.join(seed)).unwrap().to_rgb8(),
                    image::open(b.join(seed)).unwrap().to_rgb8(),
                    "{method}/{f}/{seed}"
                );
            }
        }
    }

    // `decorr eval run` on the method folders: one report row per method.
    let captions = work.path().join("captions.jsonl");
    std::fs::write(
        &captions,
        "{\"image\": \"seed-000000.png\", \"caption\": \"a train on rusty tracks\"}\n\
         {\"image\": \"seed-000001.png\", \"caption\": \"a red cube\"}\n",
    )
    .unwrap();
    let eval = work.path().join("eval");
    let runs: Vec<String> = ["sd", "pag", "aae", "ours"]
        .iter()
        .map(|m| out.join(m).to_str().unwrap().to_string())
        .collect();
    let bert = fixtures().join("bertscore/bert_tiny");
    let objects_file = out.join("objects.json");
    let mut args = vec!["eval", "run", "--runs"];
    args.extend(runs.iter().map(String::as_str));
    args.extend([
        "--captions",
        captions.to_str().unwrap(),
        "--objects-file",
        objects_file.to_str().unwrap(),
        "--bertscore-model",
        bert.to_str().unwrap(),
        "--out",
        eval.to_str().unwrap(),
    ]);
    let o = decorr(&args);
    assert!(o.status.success(), "{}", text(&o));
    let report = json(&eval.join("report.json"));
    let methods: Vec<&str> = report["report"]["tables"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    let mut sorted = methods.clone();
    sorted.sort();
    assert_eq!(sorted, ["aae", "ours", "pag", "sd"], "{methods:?}");
}

#[test]
fn compare_refuses_bad_pairs_and_methods_before_writing() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("cmp");
    let bad = work.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a cat\", \"objects\": [\"cat\"]}\n").unwrap();
    let w = sd_tiny();
    let base = |pairs: &Path, extra: &[&str]| {
        let mut v: Vec<String> = [
            "compare",
            "--weights",
            w.to_str().unwrap(),
            "--pairs",
            pairs.to_str().unwrap(),
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let check = |args: Vec<String>, needles: &[&str]| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_fails(&refs, needles);
        assert!(!out.exists(), "{args:?}: nothing written");
    };
    check(
        base(&bad, &[]),
        &["bad.jsonl line 1", "\"objects\": [\"tracks\", \"train\"]"],
    );
    let horse = work.path().join("horse.jsonl");
    std::fs::write(
        &horse,
        format!("{{\"prompt\": \"{PROMPT}\", \"objects\": [\"tracks\", \"horse\"]}}\n"),
    )
    .unwrap();
    check(
        base(&horse, &[]),
        &["`horse` is not in the prompt", "rusty, tracks"],
    );
    let same = work.path().join("same.jsonl");
    std::fs::write(
        &same,
        format!("{{\"prompt\": \"{PROMPT}\", \"objects\": [\"train\", \"train\"]}}\n"),
    )
    .unwrap();
    check(base(&same, &[]), &["same token", "two different objects"]);
    let long = work.path().join("long.jsonl");
    let long_prompt = format!("{}and an old boat", "a cat ".repeat(40));
    std::fs::write(
        &long,
        format!("{{\"prompt\": \"{long_prompt}\", \"objects\": [\"cat\", \"boat\"]}}\n"),
    )
    .unwrap();
    check(
        base(&long, &[]),
        &["`boat` is in the prompt but after the cut", "84"],
    );
    let good = pairs_file(work.path());
    check(
        base(&good, &["--methods", "sd,boat"]),
        &["unknown method `boat`", "disendiff"],
    );
    check(
        base(&good, &["--methods", "aae"]),
        &["--excite-attn-res 16", "4, 8"],
    );
    check(
        base(&good, &["--excite", "train"]),
        &["--excite", "from --pairs"],
    );
}

/// The shipped example pairs file parses, and every pair's objects are words of its prompt.
#[test]
fn the_example_pairs_file_runs() {
    let work = tempfile::tempdir().unwrap();
    let pairs =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/compare/example-pairs.jsonl");
    let file = std::fs::read_to_string(&pairs).unwrap();
    assert!(
        file.contains(&format!("\"prompt\": \"{PROMPT}\"")),
        "the paper's pair"
    );
    let out = work.path().join("cmp");
    let o = compare(&pairs, &out, &["--methods", "sd,aae"]);
    assert!(o.status.success(), "{}", text(&o));
    let objects = json(&out.join("objects.json"));
    assert!(objects.as_object().unwrap().len() >= 5, "{objects}");
    assert_eq!(objects[PROMPT], serde_json::json!(["tracks", "train"]));
}

/// DisenDiff as a compared method: trained per pair with BASELINES' defaults (250 steps on 8
/// generated images), then sampled with the modifiers in the prompt.
#[test]
fn compare_trains_and_samples_disendiff() {
    let work = tempfile::tempdir().unwrap();
    let pairs = work.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        format!("{{\"prompt\": \"{PROMPT}\", \"objects\": [\"tracks\", \"train\"]}}\n"),
    )
    .unwrap();
    let out = work.path().join("out");
    let o = compare(&pairs, &out, &["--methods", "sd,disendiff"]);
    assert!(o.status.success(), "{}", text(&o));
    let folder = FOLDERS[0];
    let report = json(&out.join("disendiff-train").join(folder).join("report.json"));
    assert_eq!(report["steps_done"], 250);
    assert_eq!(report["training_images"].as_array().unwrap().len(), 8);
    let manifest = json(&out.join("disendiff").join(folder).join("manifest.json"));
    let images = manifest["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for im in images {
        assert_eq!(im["method"], "disendiff", "{im}");
        assert_eq!(im["prompt"], "rusty <new1> tracks with an old <new2> train");
    }
    // The images differ from the pre-trained model's for the same seed.
    let a = std::fs::read(
        out.join("sd")
            .join(folder)
            .join(images[0]["file"].as_str().unwrap()),
    );
    let b = std::fs::read(
        out.join("disendiff")
            .join(folder)
            .join(images[0]["file"].as_str().unwrap()),
    );
    assert_ne!(a.unwrap(), b.unwrap());
    // Resuming reuses the finished training.
    let o = compare(&pairs, &out, &["--methods", "sd,disendiff"]);
    assert!(
        o.status.success() && text(&o).contains("already finished"),
        "{}",
        text(&o)
    );
}
