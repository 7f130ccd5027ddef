"""The benchmark scripts run (tiny sizes), so benchmarks/device.sh is ready for a GPU machine, and the
reference formulations of benchmarks/cpu_conv.py compute the convolution they stand for."""

import json
import subprocess

import jax
import jax.numpy as jnp
import pytest

from benchmarks import cpu_conv, sampler, train_step
from rediffinet_jax.models import layers


def _records(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_sampler_benchmark_runs(capsys):
    sampler.main(["--size", "16,16,16", "--steps", "2", "--samples", "2", "--repeats", "1",
                  "--features", "8,8,16,32,64,8"])
    (rec,) = _records(capsys.readouterr().out)
    assert rec["window_s"] > 0 and rec["tflop_per_window"] > 0 and 0 < rec["fraction_of_peak"] < 1.5


def test_train_step_benchmark_runs(capsys):
    train_step.main(["--unet_size", "16,16,16", "--diff_size", "16,16,16", "--tiny", "--repeats", "1"])
    recs = _records(capsys.readouterr().out)
    assert [r["bench"] for r in recs] == ["train_step_unet", "train_step_rediffinet"]
    assert all(r["step_s"] > 0 and r["batch"] == 2 for r in recs)


def test_device_script_parses():
    assert subprocess.run(["bash", "-n", "benchmarks/device.sh"]).returncode == 0


@pytest.mark.parametrize("stride", [1, 2])
def test_reference_formulations_equal_native(stride):
    x = jax.random.normal(jax.random.key(0), (1, 6, 8, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 4))
    native = layers.conv3d(x, w, stride, 1, "xla")
    for name in ("im2col", "27 matmuls", "cpu taps on inputs", "cpu (package)"):
        got = cpu_conv.CONV_FORMULATIONS[name](x, w, stride)
        assert got.shape == native.shape, name
        assert float(jnp.abs(got - native).max()) < 1e-4, name


def test_compile_only_reports_xla_memory_plan(capsys):
    sampler.main(["--size", "16,16,16", "--steps", "2", "--samples", "2", "--features", "8,8,16,32,64,8",
                  "--compile_only"])
    (rec,) = _records(capsys.readouterr().out)
    # the float32 condition image alone is 16³ × 7 × 4 bytes; temporaries hold at least x_t for 2 samples
    assert rec["bench"] == "sampler_memory" and rec["argument_gib"] * 2**30 >= 16**3 * 7 * 4
    assert rec["temp_gib"] * 2**30 >= 2 * 16**3 * 3 * 4
