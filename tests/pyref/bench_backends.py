#!/usr/bin/env python3
"""decorr on LibTorch's CPU device (tch-cpu) and on flex against PyTorch at its best, one workload
after the other in one run on this machine (2 threads), with each side's peak resident memory:
the CPU table of docs/benchmarks.md.

    python tests/pyref/bench_backends.py [--only unet32,unet64,cfg,pag,aae,finetune,disendiff]
        [--backends tch-cpu,flex] [--steps 50] [--json PATH]
    python tests/pyref/bench_backends.py --only sdxl-unet,sdxl-image,sdxl-finetune [--tiny]

Run it with the Python whose torch is the one decorr links (2.9.0, with diffusers 0.42.1 and
transformers) first on PATH, and LIBTORCH_USE_PYTORCH=1: it builds the benches once with
`cargo bench --no-run --features decorr-unet/tch,decorr-trainer/tch` and runs their binaries (DECORR_BACKEND picks the
backend). Workloads (ours / PyTorch's script):
  unet32, unet64   decorr-unet `unet HW 3`            / pyref bench.py unet HW 3 (SDPA, inference_mode)
  cfg, pag, aae    decorr-pipeline `sample_loop 32 N` / bench_guidance.py (diffusers' pipelines)
  finetune         decorr-trainer `train_step 5 all`  / pyref bench_finetune.py (best of default and
                                                        fused AdamW, 77 tokens or the causal prefix)
  disendiff        decorr-disendiff `train_step 5`    / bench_disendiff_step.py (best of its configs)
SDXL base, random weights (not in the default set; tests/pyref/bench_sdxl.py is PyTorch's side):
  sdxl-unet        decorr-unet `unet sdxl 64 3`        / bench_sdxl.py unet 64 3: one UNet call at
                                                        64x64 latents (512 px), batch 2 and batch 1
  sdxl-image       decorr-pipeline `sample_loop 64 20 sdxl` / bench_sdxl.py image 64 20
                                                        (StableDiffusionXLPipeline): 512 px, 20 Euler
                                                        steps with CFG, text encoding and VAE decode
  sdxl-finetune    decorr-trainer `train_step 5 all sdxl1|sdxl2` / bench_sdxl.py finetune 1|2 5: one
                                                        fine-tuning step of each text encoder at layer
                                                        n-2 (best of default/fused AdamW, 77 tokens or
                                                        the causal prefix)
  --tiny runs them on the tiny SDXL model of tests/fixtures/sdxl_tiny (its configs, random weights;
  DECORR_SDXL_CONFIGS for ours) at 8x8 latents and 64 px with 2 steps: a check of the harness
  in seconds, not a measurement.
Ratios are ours / PyTorch's (lower is faster). The pyref scripts live in ../shared/reference/pyref
(DECORR_PYREF overrides).
"""
import argparse, json, os, re, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYREF = os.environ.get("DECORR_PYREF", os.path.join(ROOT, "..", "shared", "reference", "pyref"))
PY = sys.executable
SDXL_PY = os.path.join(ROOT, "tests", "pyref", "bench_sdxl.py")
SDXL_TINY = os.path.join(ROOT, "tests", "fixtures", "sdxl_tiny")


def build():
    """Builds the four bench binaries with one feature set; returns {name: path}."""
    cmd = ["cargo", "bench", "--no-run", "--locked", "--message-format=json", "--features", "decorr-unet/tch,decorr-trainer/tch",
           "-p", "decorr-unet", "-p", "decorr-pipeline", "-p", "decorr-trainer", "-p", "decorr-disendiff"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    exes = {}
    for line in out.splitlines():
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
            exes[(m["package_id"].split("#")[0].rsplit("/", 1)[-1], m["target"]["name"])] = m["executable"]
    return {"unet": exes[("decorr-unet", "unet")], "sample_loop": exes[("decorr-pipeline", "sample_loop")],
            "finetune": exes[("decorr-trainer", "train_step")], "disendiff": exes[("decorr-disendiff", "train_step")]}


def timed(cmd, env=None):
    """Runs cmd under GNU time; returns (stdout+stderr, wall s, peak RSS GB)."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M"] + cmd, cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    text = p.stdout
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    rss = int(re.findall(r"MAXRSS_KB (\d+)", text)[-1]) / 1e6
    return text, wall, rss


def seconds(text, pattern):
    m = re.findall(pattern, text)
    if not m:
        sys.exit(f"no match for {pattern!r} in:\n{text[-2000:]}")
    return float(m[-1])


def sdxl_workload(w, exes, tiny):
    """An SDXL workload: ([(row label, PyTorch's time from its output, ours from ours)], PyTorch's
    command, our command, extra environment for ours). PyTorch's and our binaries each run once
    per workload (sdxl-finetune: once per encoder, see main)."""
    env = {"DECORR_SDXL_CONFIGS": SDXL_TINY} if tiny else {}
    cfg = ["--configs", SDXL_TINY] if tiny else []
    model = "tiny SDXL" if tiny else "SDXL"
    if w == "sdxl-unet":
        hw, n = ("8", "3") if tiny else ("64", "3")
        rows = []
        for b in (2, 1):
            pat = rf"sdxl unet call, batch {b}, .*median of \d+\): ([\d.]+) s"
            rows.append((f"{model} UNet call, batch {b}, {hw}x{hw} latents",
                         lambda text, pat=pat: seconds(text, pat), lambda text, pat=pat: seconds(text, pat)))
        return rows, [PY, SDXL_PY, "unet", hw, n] + cfg, [exes["unet"], "sdxl", hw, n], env
    if w == "sdxl-image":
        hw, steps = ("8", "2") if tiny else ("64", "20")
        pat = r"total ([\d.]+) s"
        what = f"{model} CFG image, {steps} Euler steps, {int(hw) * 8} px (total, incl. text encoders and VAE decode)"
        return ([(what, lambda text: seconds(text, pat), lambda text: seconds(text, pat))],
                [PY, SDXL_PY, "image", hw, steps] + cfg, [exes["sample_loop"], hw, steps, "sdxl"], env)
    if w in ("sdxl-finetune-1", "sdxl-finetune-2"):
        k, n = w[-1], "3" if tiny else "5"
        name = ("text_encoder" if k == "1" else "text_encoder_2") + ("" if tiny else " (CLIP-L)" if k == "1" else " (bigG)")

        def best(text):
            return min(json.loads(l[7:])["median_s"] for l in text.splitlines() if l.startswith("RESULT "))
        what = f"{model} {name} fine-tuning step at layer n-2, all parameters"
        return ([(what, best, lambda text: seconds(text, r"median of \d+\): ([\d.]+) s"))],
                [PY, SDXL_PY, "finetune", k, n] + cfg, [exes["finetune"], n, "all", f"sdxl{k}"], env)
    sys.exit(f"unknown workload {w}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="unet32,unet64,cfg,pag,aae,finetune,disendiff")
    p.add_argument("--backends", default="tch-cpu,flex")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--json")
    p.add_argument("--tiny", action="store_true",
                   help="SDXL workloads on the tiny SDXL model, small sizes: a quick check of the harness")
    a = p.parse_args()
    exes = build()
    backends = [b for b in a.backends.split(",") if b]
    rows = []
    only = [w for w in a.only.split(",") if w]
    # Each SDXL encoder is a process of its own on both sides (its own peak memory).
    only = [x for w in only for x in ((w + "-1", w + "-2") if w == "sdxl-finetune" else (w,))]
    for w in only:
        if w.startswith("sdxl-"):
            parts, ref_cmd, ours_cmd, extra = sdxl_workload(w, exes, a.tiny)
            text, _, rss = timed(ref_cmd)
            group = []
            for what, ref_parse, _ in parts:
                group.append(dict(workload=w, what=what, torch_s=ref_parse(text), torch_rss_gb=rss))
                print(f"[{w}] {what}: PyTorch {group[-1]['torch_s']:.3f} s, {rss:.2f} GB", flush=True)
            for b in backends:
                env = {k: v for k, v in os.environ.items() if k != "DECORR_SDXL_CONFIGS"}
                text, _, rss = timed(ours_cmd, dict(env, DECORR_BACKEND=b, **extra))
                for row, (what, _, ours_parse) in zip(group, parts):
                    row[f"{b}_s"] = ours_parse(text)
                    row[f"{b}_rss_gb"] = rss
                    print(f"[{w}] {what}: {b} {row[f'{b}_s']:.3f} s ({row[f'{b}_s'] / row['torch_s']:.2f}x), "
                          f"{rss:.2f} GB", flush=True)
            rows.extend(group)
            continue
        if w.startswith("unet"):
            hw = w[4:]
            ref = ([PY, os.path.join(PYREF, "bench.py"), "unet", hw, "3"], r'"median_s": ([\d.]+)')
            ours = ([exes["unet"], "unet", hw, "3"], r"median of \d+\): ([\d.]+) s")
            what = f"UNet call, batch 2, {hw}x{hw} latents"
        elif w in ("cfg", "pag", "aae"):
            ref = ([PY, os.path.join(ROOT, "tests/pyref/bench_guidance.py"), w, "32", str(a.steps)], r"total ([\d.]+) s")
            ours = ([exes["sample_loop"], "32", str(a.steps), w], r"total ([\d.]+) s")
            what = f"{w.upper()} image, {a.steps} DDIM steps, 256 px (total)"
        elif w == "finetune":
            ref = ([PY, os.path.join(PYREF, "bench_finetune.py"), "5"], None)
            ours = ([exes["finetune"], "5", "all"], r"median of \d+\): ([\d.]+) s")
            what = "`fix` fine-tuning step (text encoder, all parameters)"
        elif w == "disendiff":
            dd_json = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-disendiff-{os.getpid()}.json")
            ref = ([PY, os.path.join(ROOT, "tests/pyref/bench_disendiff_step.py"), "--steps", "4", "--warmup", "1",
                    "--configs", "fused,fused_sdpa", "--json", dd_json], None)
            ours = ([exes["disendiff"], "5"], r"median ([\d.]+) s")
            what = "DisenDiff micro-step + AdamW, batch 2, 256 px"
        else:
            sys.exit(f"unknown workload {w}")
        row = dict(workload=w, what=what)
        text, _, rss = timed(ref[0])
        if w == "finetune":
            row["torch_s"] = min(json.loads(l[7:])["median_s"] for l in text.splitlines() if l.startswith("RESULT "))
        elif w == "disendiff":
            with open(dd_json) as f:
                row["torch_s"] = json.load(f)["reference_at_its_best"]["step"]["median_s"]
            os.remove(dd_json)
        else:
            row["torch_s"] = seconds(text, ref[1])
        row["torch_rss_gb"] = rss
        print(f"[{w}] PyTorch: {row['torch_s']:.3f} s, {rss:.2f} GB", flush=True)
        for b in backends:
            env = dict(os.environ, DECORR_BACKEND=b)
            text, _, rss = timed(ours[0], env)
            row[f"{b}_s"] = seconds(text, ours[1])
            row[f"{b}_rss_gb"] = rss
            print(f"[{w}] {b}: {row[f'{b}_s']:.3f} s ({row[f'{b}_s'] / row['torch_s']:.2f}x), {rss:.2f} GB", flush=True)
        rows.append(row)
    print()
    head = "| workload | PyTorch 2.9.0 | " + " | ".join(f"decorr {b}" for b in backends) + " |"
    print(head)
    print("|" + "---|" * (2 + len(backends)))
    for r in rows:
        def sec(x):  # sub-second steps (fine-tuning) get a third decimal
            return f"{x:.2f} s" if x >= 1 else f"{x:.3f} s"
        cells = [f"{sec(r[f'{b}_s'])} ({r[f'{b}_s'] / r['torch_s']:.2f}x), {r[f'{b}_rss_gb']:.1f} GB" for b in backends]
        print(f"| {r['what']} | {sec(r['torch_s'])}, {r['torch_rss_gb']:.1f} GB | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
