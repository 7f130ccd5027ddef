"""The CPU formulations of the convolutions against XLA's native ones: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rediffinet_jax.models.layers import conv3d, conv_transpose3d


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# Every CPU formulation: taps on outputs (stride 1, "same"; depth 1 and 2 below the kernel's 3), taps on
# inputs (stride 2; stride 1 without padding), the matrix product (1×1×1); odd and even sizes.
@pytest.mark.parametrize(
    "shape,stride,k,pad,cin,cout",
    [
        ((1, 9, 10, 7), 1, 3, 1, 3, 5),
        ((2, 8, 8, 8), 1, 3, 1, 4, 6),
        ((1, 1, 5, 4), 1, 3, 1, 2, 3),
        ((1, 2, 4, 5), 1, 3, 1, 3, 2),
        ((1, 7, 6, 5), 1, 3, 0, 3, 4),
        ((1, 12, 10, 8), 2, 3, 1, 5, 4),
        ((1, 9, 7, 11), 2, 3, 1, 2, 3),
        ((2, 6, 6, 6), 1, 1, 0, 4, 3),
    ],
)
@pytest.mark.parametrize("impl", ["2d", "2d_sum"])
def test_conv3d_2d_equals_native_with_gradients(shape, stride, k, pad, cin, cout, impl):
    kx, kk = jax.random.split(jax.random.key(sum(shape) + stride))
    x = jax.random.normal(kx, shape + (cin,))
    kernel = jax.random.normal(kk, (k, k, k, cin, cout))

    def loss(impl):
        return lambda x, w: jnp.sum(jnp.sin(conv3d(x, w, stride, pad, impl)))

    # jitted, as the models run them: one program each instead of one per operation (faster to compile)
    a = jax.jit(lambda x, w: conv3d(x, w, stride, pad, impl))(x, kernel)
    b = jax.jit(lambda x, w: conv3d(x, w, stride, pad, "xla"))(x, kernel)
    assert a.shape == b.shape
    assert _rel(a, b) < 1e-5
    ga = jax.jit(jax.grad(loss(impl), argnums=(0, 1)))(x, kernel)
    gb = jax.jit(jax.grad(loss("xla"), argnums=(0, 1)))(x, kernel)
    for u, v in zip(ga, gb):
        assert _rel(u, v) < 1e-5


@pytest.mark.parametrize("shape,cin,cout", [((1, 3, 4, 5), 4, 2), ((2, 4, 4, 4), 6, 6)])
def test_conv_transpose_2d_equals_native_with_gradients(shape, cin, cout):
    x = jax.random.normal(jax.random.key(0), shape + (cin,))
    kernel = jax.random.normal(jax.random.key(1), (2, 2, 2, cin, cout))
    a, b = (jax.jit(lambda x, w, i=i: conv_transpose3d(x, w, 2, i))(x, kernel) for i in ("2d", "xla"))
    assert a.shape == b.shape == (shape[0], 2 * shape[1], 2 * shape[2], 2 * shape[3], cout)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def loss(impl):
        return lambda x, w: jnp.sum(jnp.cos(conv_transpose3d(x, w, 2, impl)))

    ga, gb = (jax.jit(jax.grad(loss(i), argnums=(0, 1)))(x, kernel) for i in ("2d", "xla"))
    for u, v in zip(ga, gb):
        assert _rel(u, v) < 1e-5


def test_impl_override(monkeypatch):
    from rediffinet_jax.models import layers

    monkeypatch.setenv("REDIFFINET_CONV", "xla")
    assert layers.conv_impl() == "xla"
    monkeypatch.setenv("REDIFFINET_CONV", "fast")
    with pytest.raises(ValueError, match="REDIFFINET_CONV"):
        layers.conv_impl()
    monkeypatch.delenv("REDIFFINET_CONV")
    assert layers.conv_impl() == "2d"  # the tests run on the CPU
    # a GPU takes the 2-D formulations too (measured faster there, benchmarks/results/h200-*-layers.log) with
    # the depth taps summed in place (less memory), a TPU XLA's
    for backend, impl in (("gpu", "2d_sum"), ("cuda", "2d_sum"), ("tpu", "xla")):
        monkeypatch.setattr(layers.jax, "default_backend", lambda b=backend: b)
        assert layers.conv_impl() == impl, backend


# big enough for XLA's CPU compiler to hand the 2-D convolution to YNNPACK by default (4³×2 is not)
_YNN_SIZED = (jnp.ones((1, 16, 16, 16, 8)), jnp.ones((3, 3, 3, 8, 8)))


def test_jit_compiles_convolutions_with_eigen_not_ynnpack():
    # compiling.jit passes XLA_OPTIONS: the 2-D convolutions of the CPU path stay XLA's own (Eigen), measured
    # 1.4-2x faster here than YNNPACK's, which XLA picks by default
    from rediffinet_jax import compiling

    x, w = _YNN_SIZED
    text = compiling.jit(lambda x, w: conv3d(x, w, 1, 1, "2d")).lower(x, w).compile().as_text()
    assert "convolution(" in text and "__ynn_fusion" not in text
    # and without the options XLA does give this convolution to YNNPACK (else the check above is empty)
    assert "__ynn_fusion" in jax.jit(lambda x, w: conv3d(x, w, 1, 1, "2d")).lower(x, w).compile().as_text()


def test_jit_passes_the_cpu_options_on_the_cpu_only(monkeypatch):
    # another backend gets no XLA_OPTIONS (its XLA may not know the CPU field): with the backend reported
    # as "gpu" the same CPU compile keeps XLA's default, which gives the 2-D convolutions to YNNPACK
    from rediffinet_jax import compiling

    x, w = _YNN_SIZED
    f = compiling.jit(lambda x, w: conv3d(x, w, 1, 1, "2d"))
    monkeypatch.setattr(compiling.jax, "default_backend", lambda: "gpu")
    assert "__ynn_fusion" in f.lower(x, w).compile().as_text()
    assert f(x, w).shape == (1, 16, 16, 16, 8)


def test_summed_taps_plan_less_memory_than_stacked():
    """XLA's memory plan of one stride-1 layer's forward and backward: the taps summed in place need less
    than one convolution with three times the outputs, whose output and gradient are 3× the result."""
    x = jnp.ones((1, 32, 32, 32, 16))
    w = jnp.ones((3, 3, 3, 16, 16))
    temp = {}
    for impl in ("2d", "2d_sum"):
        g = jax.jit(jax.grad(lambda x, w, i=impl: jnp.sum(jnp.sin(conv3d(x, w, 1, 1, i))), argnums=(0, 1)))
        temp[impl] = g.lower(x, w).compile().memory_analysis().temp_size_in_bytes
    result = x.size * 4  # bytes of one 32³×16 float32 volume
    assert temp["2d"] >= 5 * result  # y and its gradient (3× each) cannot both be avoided
    assert temp["2d_sum"] <= temp["2d"] - 2 * result, temp


def test_gpu_formulation_in_the_whole_model_with_remat(monkeypatch):
    """The denoiser's gradients with the GPUs' 2d_sum (its own backward) under jax.checkpoint equal the
    CPU's 2d ones: the custom backward composes with remat and the rest of the network."""
    from flax import nnx

    from rediffinet_jax.models.denoiser import DiffusionNet

    cond = jax.random.normal(jax.random.key(0), (2, 16, 16, 16, 7))
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 16, 3))
    grads = {}
    for impl in ("2d", "2d_sum"):
        monkeypatch.setenv("REDIFFINET_CONV", impl)
        net = DiffusionNet(7, 3, (4, 4, 8, 8, 16, 4), remat=True, rngs=nnx.Rngs(0))
        gd, st = nnx.split(net)
        loss = lambda st, gd=gd: jnp.sum(jnp.sin(nnx.merge(gd, st)(cond, x, jnp.array([3, 700]))))  # noqa: E731
        grads[impl] = jax.tree.leaves(jax.jit(jax.grad(loss))(st))
    flat = {k: jnp.concatenate([g.ravel() for g in v]) for k, v in grads.items()}
    assert _rel(flat["2d_sum"], flat["2d"]) < 1e-5
    # leaf by leaf, up to rounding of the whole's size (a conv bias before a norm has a zero gradient)
    scale = float(jnp.max(jnp.abs(flat["2d"])))
    for a, b in zip(grads["2d_sum"], grads["2d"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)
