"""benchmarks/device.sh runs its whole sequence (tiny sizes), so it is ready for a GPU machine, and the
reference formulations of benchmarks/cpu_conv.py compute the convolution they stand for."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import cpu_conv, hlo_profile, sampler, summary
from benchmarks import layers as layer_bench
from rediffinet_jax.models import layers


def _records(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# Installed here but not on the GPU machines (device tool's KINDS.md package list): device.sh runs without.
GPU_MISSING = ("grain", "nibabel", "ml_collections", "surface_distance")
_BLOCKER = f"""import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {GPU_MISSING!r}:
            raise ModuleNotFoundError(f"{{name}} is not on the GPU machines")
sys.meta_path.insert(0, _Missing())
"""


def _gpu_like_env(tmp_path, **env):
    """The environment with a sitecustomize that makes GPU_MISSING unimportable."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    # PYTHON: the interpreter running the tests runs the script's Python too (device.sh defaults to python3)
    return {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": path, "PYTHON": sys.executable, **env}


def _device_sh(tmp_path, **env):
    return subprocess.run(
        ["bash", "benchmarks/device.sh"],
        env=_gpu_like_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=500,
    )


def test_gpu_like_env_blocks_the_missing_packages(tmp_path):
    env = _gpu_like_env(tmp_path)
    for name in GPU_MISSING:
        r = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert r.returncode != 0 and "not on the GPU machines" in r.stderr, name
    assert (
        subprocess.run([sys.executable, "-c", "import scipy, flax, optax, orbax.checkpoint"], env=env).returncode == 0
    )


def test_device_script_smoke(tmp_path):
    """The GPU script's whole sequence at 16³ on the CPU, without the packages the GPU machines lack: seven
    benchmarks, one table, the targets judged, then the single layers and their table."""
    r = _device_sh(tmp_path, SMOKE="1")
    assert r.returncode == 0, r.stdout + r.stderr
    recs = summary.read(tmp_path / "device.jsonl")
    assert [(x["bench"], x["dtype"], x.get("remat", False)) for x in recs] == [
        ("sampler", "bfloat16", False),
        ("train_step_rediffinet", "bfloat16", False),
        ("train_step_unet", "bfloat16", False),
        ("sampler", "float32", False),
        ("train_step_rediffinet", "float32", False),
        ("train_step_rediffinet", "float32", False),
        ("train_step_rediffinet", "bfloat16", True),
    ]
    assert all(x["tflop_per_window"] > 0 and x["window_s"] > 0 for x in recs if x["bench"] == "sampler")
    assert [x["batch"] for x in recs if x["bench"] != "sampler"] == [2, 2, 2, 4, 2]
    assert all(x["step_s"] > 0 for x in recs if x["bench"] != "sampler")
    assert all(0 < x["fraction_of_peak"] < 1.5 for x in recs)
    table = r.stdout[r.stdout.index("| benchmark |") : r.stdout.index("| layer |")]
    assert table.count("\n| ") == 7 and "| sampler, one window | bfloat16 | no | 16×16×16 | 2×2 |" in table
    assert "target, bfloat16 window ≤ 1.5 s at ≥ 30% of peak: " in table and "not measured" not in table
    assert (tmp_path / "device.log").read_text().count("--- benchmarks/") == 8
    # the finest level's layers, bfloat16: 3 stride-1 convolutions × 3 formulations, the strided and the
    # transposed one × 2 (2d_sum is 2d there), pool, norm
    layer_recs = summary.read(tmp_path / "device.jsonl", "layer")
    assert len(layer_recs) == 15 and {x["dtype"] for x in layer_recs} == {"bfloat16"}
    assert all(x["forward_ms"] > 0 and x["train_ms"] > 0 for x in layer_recs)
    strided = [x for x in layer_recs if x["layer"].startswith("conv k3 s2")]
    assert [x["output"] for x in strided] == [[2, 8, 8, 8, 8]] * 2 and [x["input"] for x in strided] == [
        [2, 16, 16, 16, 4]
    ] * 2
    assert r.stdout.count("\n| conv") == 13 and "| maxpool2 8 | bfloat16 | 2×16×16×16×8 |" in r.stdout
    # one profile of each bfloat16 sampler and train step: two files each, the reports in the log, the
    # Re-DiffiNet step's table by source printed, naming the model's convolutions
    prefixes = ("sampler-bfloat16", "step-rediffinet-bfloat16", "step-unet-bfloat16")
    assert sorted(p.name for p in tmp_path.glob("*.gz")) == sorted(
        f"{p}.{e}.gz" for p in prefixes for e in ("hlo.txt", "trace.json")
    )
    assert all(f"profile {p}: " in (tmp_path / "device.log").read_text() for p in prefixes)
    assert "profile step-rediffinet-bfloat16: " in r.stdout and "conv3d" in r.stdout.split("by source")[1].lower()


def test_device_script_deadline(tmp_path):
    r = _device_sh(tmp_path, DEADLINE_S="0")  # every benchmark needs 30 s: all skipped, however fast the machine
    assert r.returncode == 0 and r.stdout.count("skipped, ") == 8
    assert "target, bfloat16 window: not measured" in r.stdout


def test_summary_targets():
    def rec(bench, secs, frac, dtype="bfloat16", remat=False):
        return {
            "bench": bench,
            "dtype": dtype,
            "remat": remat,
            "window_s": secs,
            "step_s": secs,
            "fraction_of_peak": frac,
        }

    met = summary.targets([rec("sampler", 1.2, 0.35), rec("train_step_rediffinet", 0.5, 0.31)])
    assert [line.split(": ")[1].split(" ")[0] for line in met] == ["met", "met"]
    missed = summary.targets(
        [
            rec("sampler", 1.6, 0.35),
            rec("sampler", 1.0, 0.9, "float32"),
            rec("train_step_rediffinet", 0.5, 0.9, remat=True),
            rec("train_step_rediffinet", 0.5, 0.29),
        ]
    )
    assert [line.split(": ")[1].split(" ")[0] for line in missed] == ["missed", "missed"]
    assert summary.targets([rec("sampler", 1.5, 0.29)])[0].split(": ")[1].startswith("missed")


@pytest.mark.parametrize("stride", [1, 2])
def test_reference_formulations_equal_native(stride):
    x = jax.random.normal(jax.random.key(0), (1, 6, 8, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 4))
    native = layers.conv3d(x, w, stride, 1, "xla")
    for name in ("im2col", "27 matmuls", "2d taps on inputs", "2d (package)"):
        got = cpu_conv.CONV_FORMULATIONS[name](x, w, stride)
        assert got.shape == native.shape, name
        assert float(jnp.abs(got - native).max()) < 1e-4, name


def test_compile_only_reports_xla_memory_plan(capsys):
    sampler.main(
        ["--size", "16,16,16", "--steps", "2", "--samples", "2", "--features", "8,8,16,32,64,8", "--compile_only"]
    )
    (rec,) = _records(capsys.readouterr().out)
    # the float32 condition image alone is 16³ × 7 × 4 bytes; temporaries hold at least x_t for 2 samples
    assert rec["bench"] == "sampler_memory" and rec["argument_gib"] * 2**30 >= 16**3 * 7 * 4
    assert rec["temp_gib"] * 2**30 >= 2 * 16**3 * 3 * 4


@pytest.mark.parametrize("name", ["conv k3 8->8 xla", "conv k3 8->8 2d", "convT k2 8->8 2d", "conv k3 s2 4->8 xla"])
def test_layer_benchmark_times_forward_and_backward(name):
    """A convolution's gradients with respect to input and kernel cost two forwards, so the timed train
    function must count about three times the forward's FLOPs (XLA's own count); under jax.grad alone, as
    in the first H200 run, the forward is dead code and it counts two."""
    _, cin, scale, fn, shapes, _ = {r[0]: r for r in layer_bench.cases(8)}[name]
    x, params, g, fwd, train = layer_bench.functions(cin, scale, fn, shapes, (8, 8, 8), 2, jnp.float32)

    def flops(f, *args):
        cost = f.lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert 2.7 < flops(train, x, params, g) / flops(fwd, x, params) < 3.3
    loss, _ = train(x, params, g)
    assert float(loss) == pytest.approx(float(jnp.sum(fwd(x, params) * g)), rel=1e-4)


def _inner(x):
    return jnp.tanh(x @ x)  # the costly line: a 512² product, forward and twice backward


def _middle(x):
    return jnp.sum(_inner(x) * 2.0)


def test_profile_names_the_costly_line(tmp_path):
    """Five traced runs on the CPU: the product's instructions come first among those with a source line,
    attributed to _inner's line with its callers, forward and backward told apart; the stack frames read
    from XLA's text are the calls. Compiled afresh: a program from the shared compilation cache keeps the
    line numbers of when it was cached (the cache's key leaves source locations out), and they move when
    this file is edited."""
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        _profile_and_check(tmp_path)
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)


def _profile_and_check(tmp_path):
    f = jax.jit(jax.value_and_grad(_middle))
    x = jax.random.normal(jax.random.key(0), (512, 512))
    jax.block_until_ready(f(x))
    # five runs traced: an elementwise instruction descheduled once by a busy machine does not outweigh the
    # products (with one run of a 256² product it did, once in a test run beside a training job)
    run = lambda: [jax.block_until_ready(f(x)) for _ in range(5)]  # noqa: E731
    hlo_profile.capture(run, f.lower(x).compile().as_text(), str(tmp_path / "p"))
    times, span = hlo_profile.read_trace(str(tmp_path / "p.trace.json.gz"))
    with gzip.open(tmp_path / "p.hlo.txt.gz", "rt") as fh:
        hlo = hlo_profile.read_hlo(fh.read())
    s = hlo_profile.summarize(times, hlo)
    line = _inner.__code__.co_firstlineno + 1
    # the lines' instructions: the cotangent's broadcast has no source line, and on a busy machine it took up
    # to 39 % of the time (a 1 MB write), more than the forward product, in 5 of 25 trials beside the suite
    named = [r for r in s["by_source"] if r["direction"] != "?"]
    top = named[:2]
    assert {r["direction"] for r in top} == {"fwd", "bwd"} and all(
        f"test_benchmarks.py:{line} _inner" in r["source"] for r in top
    ), s["by_source"][:4]
    assert "_middle" in top[0]["source"] and span > 0
    assert sum(r["share"] for r in top) > 0.5 * sum(r["share"] for r in named), s["by_source"][:4]
    report = hlo_profile.report(str(tmp_path / "p"), top=3)
    assert report.startswith("profile p: ") and report.count(f":{line} _inner") >= 2


def test_read_trace_counts_gpu_kernels_once(tmp_path):
    """A GPU-shaped trace: kernels on Stream threads count; the profiler's XLA Ops line (the same time
    again) and the host's events do not."""

    def meta(pid, tid, kind, name):
        return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}

    def ev(pid, tid, ts, dur, op, name="k"):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": {"hlo_op": op}}

    events = [
        meta(1, 0, "process_name", "/host:CPU"),
        meta(2, 0, "process_name", "/device:GPU:0"),
        meta(2, 7, "thread_name", "Stream #7(Compute)"),
        meta(2, 9, "thread_name", "XLA Ops"),
        ev(2, 7, 100.0, 30.0, "fusion.1"),
        ev(2, 7, 140.0, 10.0, "fusion.1"),
        ev(2, 7, 160.0, 5.0, "conv.2"),
        ev(2, 9, 100.0, 50.0, "fusion.1", "fusion.1"),
        ev(1, 3, 0.0, 500.0, "fusion.1"),
    ]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    times, span = hlo_profile.read_trace(str(path))
    assert times == {"fusion.1": [30.0, 10.0], "conv.2": [5.0]} and span == 65.0


def test_profile_of_the_h200_train_step():
    """The stored H200 profile of one bfloat16 Re-DiffiNet train step (jax 0.11.2: kernels replayed from
    CUDA graphs, ``scheduling_name`` in the metadata): its kernels add up to the step time that
    train_step.py measured separately, nearly all are joined to the HLO, and the 3³ convolutions come
    first."""
    prefix = os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "results", "h200-2026-11-27-after-step-rediffinet-bfloat16"
    )
    times, _ = hlo_profile.read_trace(prefix + ".trace.json.gz")
    with gzip.open(prefix + ".hlo.txt.gz", "rt") as fh:
        s = hlo_profile.summarize(times, hlo_profile.read_hlo(fh.read()), top=1000)
    (step,) = [
        r
        for r in summary.read(prefix.replace("step-rediffinet-bfloat16", "device.jsonl"))
        if r["bench"] == "train_step_rediffinet" and r["dtype"] == "bfloat16"
    ]
    assert 0.9 < s["total_us"] / 1e6 / step["step_s"] < 1.0
    unjoined = sum(r["us"] for r in s["by_source"] if r["source"] == "(not in the HLO)")
    assert unjoined / s["total_us"] < 0.01
    top = s["by_source"][0]
    assert top["direction"] == "bwd" and "conv3d" in top["source"] and "__cudnn$convBackwardFilter" in top["kinds"]


def test_stage_run_records_exit_status_and_an_interruption(tmp_path):
    """stage_run.py records a script's own exit status, and a SIGTERM (``timeout``) as 124 after the script
    saw it as a KeyboardInterrupt (what lets train.py stop as on Ctrl-C)."""
    script = tmp_path / "s.py"
    script.write_text(
        "import sys, time\nif sys.argv[1] == 'fail':\n    sys.exit(3)\n"
        "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('interrupted')\n    raise\n"
    )
    jsonl = tmp_path / "r.jsonl"
    run = ["benchmarks/stage_run.py", "x", str(jsonl), "--", str(script)]
    assert subprocess.run([sys.executable, *run, "fail"]).returncode == 3
    r = subprocess.run(["timeout", "3", sys.executable, *run, "sleep"], capture_output=True, text=True)
    assert r.returncode == 124 and "interrupted" in r.stdout
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [x["rc"] for x in recs] == [3, 124]
    assert recs[1]["seconds"] >= 2.5 and recs[1]["peak_host_gib"] > 0 and recs[1]["peak_device_gib"] is None


def test_check_label_maps_names_each_problem(phantom_root, tmp_path):
    """A missing map, a map of another shape and one with label 5 are each reported with their case."""
    import nibabel as nib
    import numpy as np

    from benchmarks import check_label_maps
    from rediffinet_jax.data import brats

    cases = brats.discover_cases(phantom_root)[:4]
    out = tmp_path / "out"
    out.mkdir()
    for i, c in enumerate(cases[1:], 1):
        ref = nib.load(c.images["t1n"])
        seg = np.asarray(nib.load(c.seg).dataobj).astype(np.uint8)
        seg = seg[:-1] if i == 2 else seg
        if i == 3:
            seg[0, 0, 0] = 5
        nib.save(nib.Nifti1Image(seg, ref.affine), out / f"{c.case_id}.nii.gz")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for c in cases:
        shutil.copytree(c.images["t1n"].parent, inputs / c.case_id)
    rec = check_label_maps.check(str(inputs), str(out))
    assert rec["cases"] == 4 and len(rec["problems"]) == 3
    assert [p.split(":")[0] for p in rec["problems"]] == [c.case_id for c in cases[:1] + cases[2:]]
    assert "shape" in rec["problems"][1] and "[5" in rec["problems"][2]


def test_memory_table(tmp_path, capsys):
    """summary.py --memory: one row per record, with the numbers of the records; other lines skipped."""
    mem = tmp_path / "m.jsonl"
    mem.write_text(
        json.dumps(
            dict(
                bench="sampler_memory",
                dtype="bfloat16",
                size=[8, 8, 8],
                steps=10,
                samples=10,
                chunk=0,
                temp_gib=43.21,
                argument_gib=0.2,
                output_gib=0.05,
            )
        )
        + "\n"
        + json.dumps(
            dict(
                bench="train_step_memory_rediffinet",
                dtype="float32",
                remat=False,
                size=[8, 8, 8],
                batch=4,
                temp_gib=7.5,
                argument_gib=0.5,
                output_gib=0.25,
            )
        )
        + "\nnot json\n"
    )
    assert summary.main(["--memory", str(mem)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows == [
        "| sampler, one window | bfloat16 | no | 8×8×8 | 10×10 (all) | 43.21 | 0.25 |",
        "| rediffinet train step | float32 | no | 8×8×8 | 4 | 7.50 | 0.75 |",
    ]


def test_pipeline_table(tmp_path, capsys):
    """summary.py --pipeline: each stage's outcome and numbers, the label maps' problems named."""
    pipe = tmp_path / "p.jsonl"
    pipe.write_text(
        json.dumps(
            dict(
                bench="pipeline_stage",
                stage="train_bench",
                rc=124,
                seconds=300.5,
                peak_device_gib=3.2,
                peak_host_gib=2.1,
                trained={"unet": [0, 1]},
            )
        )
        + "\n"
        + json.dumps(dict(bench="label_maps", cases=2, problems=["c1: no map"]))
        + "\n"
        + json.dumps(dict(bench="pipeline_stage", stage="predict", skipped=True))
        + "\n"
    )
    assert summary.main(["--pipeline", str(pipe)]) == 0
    out = capsys.readouterr().out
    assert "| train_bench | stopped at the deadline | 300.5 | 3.2 | 2.1 | unet 0,1 |" in out
    assert "| predict | skipped (no time left) |" in out and "label maps: 2 cases, 1 problems (c1: no map ...)" in out


def test_real_cases_are_checked_file_by_file(tmp_path, monkeypatch):
    """benchmarks/real_data.py: a copy whose files match real_cases.txt passes; one changed file names its case.
    (Fake files and a fake list: the real cases are BraTS data and never in the tests.)"""
    import hashlib

    from benchmarks import real_data

    lines = []
    for case in ("A", "B"):
        (tmp_path / case).mkdir()
        for name in (f"{case}_t1.nii.gz", f"{case}_seg.nii.gz"):
            (tmp_path / case / name).write_bytes(name.encode())
            lines.append(f"{case} {name} {hashlib.sha256(name.encode()).hexdigest()}")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\n" + "\n".join(lines) + "\n")
    monkeypatch.setattr(real_data, "LIST", listing)
    assert real_data.check(tmp_path) == ["A", "B"]
    (tmp_path / "B" / "B_seg.nii.gz").write_bytes(b"edited")
    with pytest.raises(SystemExit, match="case B: .*B_seg.nii.gz differs"):
        real_data.check(tmp_path)
    (tmp_path / "A" / "A_t1.nii.gz").unlink()
    with pytest.raises(SystemExit, match="case A: .*A_t1.nii.gz is missing"):
        real_data.check(tmp_path)


def test_refiners_start_from_a_copied_unet(tmp_path):
    """refinement.py --unet_from: a seed's finished U-Net (its folds, out-of-fold maps, splits, phantoms, cache)
    is copied once, without the source's refiners or scores, and the copy is named in the seed's time record;
    a source without out-of-fold maps is refused, naming it; with another baseline, refused when parsed."""
    from argparse import Namespace

    from benchmarks.refinement import _parse, _reuse_unet

    src = tmp_path / "old" / "seed_0"
    for f in (
        "unet/oof/runs.json",
        "unet/fold_0/done.json",
        "data/c1/c1-seg.nii.gz",
        "cache/c1/image.npy",
        "rediffinet/fold_0/done.json",
        "eval/summary.json",
        "config.json",
        "splits.json",
    ):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text(f)
    dest = tmp_path / "new" / "seed_0"
    a = Namespace(unet_from=str(tmp_path / "old"), baseline="unet")
    assert _reuse_unet(a, 0, dest) == f"U-Net folds copied from {src}, not timed here"
    assert sorted(p.name for p in dest.iterdir()) == ["cache", "config.json", "data", "splits.json", "unet"]
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert copied == sorted(
        [
            "unet/oof/runs.json",
            "unet/fold_0/done.json",
            "data/c1/c1-seg.nii.gz",
            "cache/c1/image.npy",
            "config.json",
            "splits.json",
        ]
    )
    assert all((dest / f).read_text() == f for f in copied)
    (dest / "unet/oof/runs.json").write_text("{}")  # a second call keeps what is there
    _reuse_unet(a, 0, dest)
    assert (dest / "unet/oof/runs.json").read_text() == "{}"
    with pytest.raises(SystemExit, match=f"{tmp_path / 'old' / 'seed_1'} has no finished U-Net"):
        _reuse_unet(a, 1, tmp_path / "new" / "seed_1")
    assert _reuse_unet(Namespace(unet_from=None, baseline="unet"), 0, dest) == ""
    with pytest.raises(SystemExit, match="--unet_from takes the U-Net's maps"):
        _parse(["--unet_from", str(tmp_path / "old"), "--baseline", "grown_edema"])


def test_commit_ignores_the_records_the_benchmarks_write(tmp_path):
    """A record or README rewritten by a benchmark between its runs leaves the commit clean; code does not."""
    from benchmarks import common

    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for name in ("code.py", "README.md", "benchmarks/results/demo_runs.json"):
        (tmp_path / name).write_text("a\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = common.commit(tmp_path)
    assert len(head) == 10 and "+" not in head
    (tmp_path / "README.md").write_text("b\n")
    (tmp_path / "benchmarks" / "results" / "demo_runs.json").write_text("b\n")
    assert common.commit(tmp_path) == head
    (tmp_path / "code.py").write_text("b\n")
    assert common.commit(tmp_path) == head + "+changes"


def test_first_runs_only_the_later_seeds(tmp_path, monkeypatch):
    """refinement.py --seeds 3 --first 2 trains seed 2 alone; with nothing finished there is no table."""
    from benchmarks import refinement

    ran = []
    monkeypatch.setattr(refinement, "run_seed", lambda workdir, configs, seed, *a, **k: ran.append(seed))
    with pytest.raises(SystemExit, match="no finished seed"):
        refinement.main(["--root", str(tmp_path), "--seeds", "3", "--first", "2"])
    assert ran == [2]
