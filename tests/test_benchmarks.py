"""benchmarks/device.sh runs its whole sequence (tiny sizes), so it is ready for a GPU machine, and the
reference formulations of benchmarks/cpu_conv.py compute the convolution they stand for."""

import gzip
import json
import os
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
    return {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": path, **env}


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
    """The GPU script's whole sequence at 16³ on the CPU, without the packages the GPU machines lack: six
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
        ("train_step_rediffinet", "bfloat16", True),
    ]
    assert all(x["tflop_per_window"] > 0 and x["window_s"] > 0 for x in recs if x["bench"] == "sampler")
    assert all(x["batch"] == 2 and x["step_s"] > 0 for x in recs if x["bench"] != "sampler")
    assert all(0 < x["fraction_of_peak"] < 1.5 for x in recs)
    table = r.stdout[r.stdout.index("| benchmark |") : r.stdout.index("| layer |")]
    assert table.count("\n| ") == 6 and "| sampler, one window | bfloat16 | no | 16×16×16 | 2×2 |" in table
    assert "target, bfloat16 window ≤ 1.5 s at ≥ 30% of peak: " in table and "not measured" not in table
    assert (tmp_path / "device.log").read_text().count("--- benchmarks/") == 7
    # the finest level's layers, both formulations of each convolution, bfloat16: 3 + 1 + 1 convolutions × 2, pool, norm
    layer_recs = summary.read(tmp_path / "device.jsonl", "layer")
    assert len(layer_recs) == 12 and {x["dtype"] for x in layer_recs} == {"bfloat16"}
    assert all(x["forward_ms"] > 0 and x["train_ms"] > 0 for x in layer_recs)
    strided = [x for x in layer_recs if x["layer"].startswith("conv k3 s2")]
    assert [x["output"] for x in strided] == [[2, 8, 8, 8, 8]] * 2 and [x["input"] for x in strided] == [
        [2, 16, 16, 16, 4]
    ] * 2
    assert r.stdout.count("\n| conv") == 10 and "| maxpool2 8 | bfloat16 | 2×16×16×16×8 |" in r.stdout
    # one profile of each bfloat16 sampler and train step: two files each, the reports in the log, the
    # Re-DiffiNet step's table by source printed, naming the model's convolutions
    prefixes = ("sampler-bfloat16", "step-rediffinet-bfloat16", "step-unet-bfloat16")
    assert sorted(p.name for p in tmp_path.glob("*.gz")) == sorted(
        f"{p}.{e}.gz" for p in prefixes for e in ("hlo.txt", "trace.json")
    )
    assert all(f"profile {p}: " in (tmp_path / "device.log").read_text() for p in prefixes)
    assert "profile step-rediffinet-bfloat16: " in r.stdout and "conv3d" in r.stdout.split("by source")[1]


def test_device_script_deadline(tmp_path):
    r = _device_sh(tmp_path, DEADLINE_S="10")
    assert r.returncode == 0 and r.stdout.count("skipped, ") == 7
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
    return jnp.tanh(x @ x)  # the costly line: a 256² product, forward and twice backward


def _middle(x):
    return jnp.sum(_inner(x) * 2.0)


def test_profile_names_the_costly_line(tmp_path):
    """A traced run on the CPU: the product's instructions come first, attributed to _inner's line with
    its callers, forward and backward told apart; the stack frames read from XLA's text are the calls."""
    f = jax.jit(jax.value_and_grad(_middle))
    x = jax.random.normal(jax.random.key(0), (256, 256))
    jax.block_until_ready(f(x))
    hlo_profile.capture(lambda: jax.block_until_ready(f(x)), f.lower(x).compile().as_text(), str(tmp_path / "p"))
    times, span = hlo_profile.read_trace(str(tmp_path / "p.trace.json.gz"))
    with gzip.open(tmp_path / "p.hlo.txt.gz", "rt") as fh:
        hlo = hlo_profile.read_hlo(fh.read())
    s = hlo_profile.summarize(times, hlo)
    line = _inner.__code__.co_firstlineno + 1
    top = s["by_source"][:2]
    assert {r["direction"] for r in top} == {"fwd", "bwd"} and all(
        f"test_benchmarks.py:{line} _inner" in r["source"] for r in top
    )
    assert "_middle" in top[0]["source"] and sum(r["share"] for r in top) > 0.5 and span > 0
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
