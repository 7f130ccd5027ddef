import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rediffinet_jax.diffusion import Variant
from rediffinet_jax.models.denoiser import DiffusionNet, timestep_embedding
from rediffinet_jax.models.layers import count_params
from rediffinet_jax.models.unet import UNet

SMALL_FEATURES = (8, 8, 16, 16, 32, 8)
SHAPE = (32, 48, 32)


# ---------------------------------------------------------------- parameter counts at the paper's size (docs/method.md)


@pytest.mark.parametrize("cin,expected", [(5, 50_838_665), (4, 50_836_937)])
def test_unet_parameter_count(cin, expected):
    abstract = nnx.eval_shape(lambda: UNet(cin, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == expected


@pytest.mark.parametrize(
    "condition,target,den,enc",
    [
        ("concat", "discrepancy", 24_118_339, 14_284_608),  # Re-DiffiNet
        ("image", "mask", 24_113_155, 14_279_424),  # Diff-U-Net
        ("unet", "mask", 24_111_427, 14_277_696),  # UA-Diffusion, U(I)
        ("concat", "mask", 24_118_339, 14_284_608),  # UA-Diffusion, concat
        ("mask", "mask", 24_113_155, 14_279_424),  # UA-Diffusion, mask
    ],
)
def test_diffusion_parameter_counts(condition, target, den, enc):
    v = Variant(condition, target)
    abstract = nnx.eval_shape(lambda: DiffusionNet(v.cond_channels, rngs=nnx.Rngs(0)))
    assert count_params(abstract.denoiser) == den
    assert count_params(abstract.encoder) == enc
    if condition == "concat" and target == "discrepancy":
        assert count_params(abstract) == 38_402_947


# ---------------------------------------------------------------- small networks


@pytest.fixture(scope="module")
def small_unet():
    return UNet(4, filters=(8, 16, 32), deep_supervision=1, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def small_diff():
    return DiffusionNet(7, features=SMALL_FEATURES, rngs=nnx.Rngs(1))


def test_unet_shapes(small_unet):
    x = jnp.ones((2, *SHAPE, 4))
    y = small_unet(x)
    assert y.shape == (2, *SHAPE, 3) and y.dtype == jnp.float32
    outs = small_unet(x, train=True)
    assert len(outs) == 2 and all(o.shape == (2, *SHAPE, 3) for o in outs)


def test_bad_spatial_size_is_named_before_compiling(small_unet, small_diff):
    with pytest.raises(ValueError, match="multiples of 4"):
        small_unet(jnp.ones((1, 32, 30, 32, 4)))
    with pytest.raises(ValueError, match="multiples of 16"):
        small_diff(jnp.ones((1, 16, 24, 16, 7)), jnp.ones((1, 16, 24, 16, 3)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="7"):
        small_diff.encode(jnp.ones((1, 16, 16, 16, 4)))
    full = nnx.eval_shape(lambda: UNet(4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="multiples of 64"):
        full(jnp.ones((1, 96, 96, 96, 4)))


def test_time_embedding_by_hand():
    emb = np.asarray(timestep_embedding(jnp.array([0, 999])))
    assert emb.shape == (2, 128)
    np.testing.assert_array_equal(emb[0, :64], 0.0)  # sin(0)
    np.testing.assert_array_equal(emb[0, 64:], 1.0)  # cos(0)
    freq = [math.exp(-j * math.log(10000) / 63) for j in range(64)]
    expected = [math.sin(999 * f) for f in freq] + [math.cos(999 * f) for f in freq]
    np.testing.assert_allclose(emb[1], expected, atol=2e-4)  # float32 argument of up to 999 rad
    assert emb[1, 63] == pytest.approx(math.sin(999 * 1e-4), abs=1e-6)  # j = 63: freq 1e-4


def test_diffusion_shapes_and_zero_features(small_diff):
    rng = np.random.default_rng(0)
    cond = jnp.asarray(rng.normal(size=(2, *SHAPE, 7)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, *SHAPE, 3)), jnp.float32)
    t = jnp.array([0, 999])
    y = small_diff(cond, x, t)
    assert y.shape == (2, *SHAPE, 3) and y.dtype == jnp.float32
    feats = small_diff.encode(cond)
    assert [f.shape[1:4] for f in feats] == [SHAPE] + [tuple(s // 2**i for s in SHAPE) for i in range(1, 5)]
    zeros = [jnp.zeros_like(f) for f in feats]
    np.testing.assert_array_equal(
        small_diff.denoise(cond, x, t, zeros), small_diff.denoiser(jnp.concatenate([cond, x], -1), t, None)
    )
    assert not np.allclose(y, small_diff.denoise(cond, x, t, zeros))  # the features do matter


def _sq_mean(m, *inputs):
    """The mean square of a network's output(s): a scalar whose gradient reaches every parameter."""
    out = m(*inputs)
    return sum(jnp.mean(o**2) for o in out) if isinstance(out, (list, tuple)) else jnp.mean(out**2)


# Jitted, not eager: one program per network and shape (shared by the tests below) instead of one per
# operation, which made these tests the slowest of the unit tests with an empty compilation cache.
_forward = nnx.jit(lambda m, *inputs: m(*inputs))
_loss = nnx.jit(_sq_mean)
_grads = nnx.jit(nnx.grad(_sq_mean))


def test_finite_gradients_for_every_parameter(small_diff, small_unet):
    x = jnp.ones((1, 16, 16, 16, 3)) * 0.5
    cond = jnp.linspace(0, 1, 16**3 * 7).reshape(1, 16, 16, 16, 7)
    unet_train = nnx.jit(nnx.grad(lambda m, c: _sq_mean(m, c, True)))  # train=True: both supervision heads
    for model, grads in (
        (small_diff, _grads(small_diff, cond, x, jnp.array([10]))),
        (small_unet, unet_train(small_unet, cond[..., :4])),
    ):
        leaves = jax.tree.leaves(grads)
        assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)


def test_no_retrace_on_same_shapes(small_diff):
    traces = []
    graphdef, state = nnx.split(small_diff)

    @jax.jit
    def f(state, cond, x, t):
        traces.append(1)
        return nnx.merge(graphdef, state)(cond, x, t)

    cond, x = jnp.ones((1, 16, 16, 16, 7)), jnp.zeros((1, 16, 16, 16, 3))
    f(state, cond, x, jnp.array([3]))
    f(state, cond * 2, x + 1, jnp.array([500]))
    assert len(traces) == 1


def test_bfloat16_close_to_float32():
    rng = np.random.default_rng(0)
    cond = jnp.asarray(rng.normal(size=(1, 16, 32, 16, 7)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(1, 16, 32, 16, 3)), jnp.float32)
    t = jnp.array([250])
    f32 = DiffusionNet(7, features=SMALL_FEATURES, rngs=nnx.Rngs(5))
    b16 = DiffusionNet(7, features=SMALL_FEATURES, dtype=jnp.bfloat16, rngs=nnx.Rngs(5))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(b16, nnx.Param)))
    a, b = _forward(f32, cond, x, t), _forward(b16, cond, x, t)
    assert b.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 2e-2
    u32 = UNet(4, filters=(8, 16, 32), deep_supervision=1, rngs=nnx.Rngs(2))
    u16 = UNet(4, filters=(8, 16, 32), deep_supervision=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
    a, b = _forward(u32, cond[..., :4]), _forward(u16, cond[..., :4])
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 2e-2


def test_pytorch_default_init_bounds(small_diff):
    conv = small_diff.denoiser.stages[0].unit1.conv  # 10 -> 8 channels, k3: fan_in 270
    bound = 1 / math.sqrt(10 * 27)
    k = np.asarray(conv.kernel[...])
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    up = small_diff.denoiser.ups[0].up  # transposed: PyTorch fan_in = out_channels · 8
    bound_t = 1 / math.sqrt(up.kernel.shape[-1] * 8)
    assert np.abs(np.asarray(up.kernel[...])).max() <= bound_t


def test_initialisation_compiles_no_program_per_parameter_shape():
    """A model of parameter shapes never seen before is built without lowering a single new program: the
    parameters are copied in, not made by a compiled program per shape (jnp.asarray and jnp.ones each
    lowered one for every new shape). A fresh jitted function in the same window must count one: the
    listener hears lowering at all."""
    from jax import monitoring
    from jax._src import dispatch

    UNet(3, filters=(5, 7, 9), deep_supervision=1, rngs=nnx.Rngs(0))  # the key's own programs, once
    lowered = []

    def count(event, _secs, **_):
        if event == dispatch.JAXPR_TO_MLIR_MODULE_EVENT:
            lowered.append(event)

    monitoring.register_event_duration_secs_listener(count)
    try:
        model = UNet(3, filters=(11, 13, 15), deep_supervision=1, rngs=nnx.Rngs(1))
        built = len(lowered)
        jax.jit(lambda x: x * 3)(np.ones(7, np.float32))
    finally:
        monitoring.unregister_event_duration_listener(count)
    assert model.head.kernel.shape[-2:] == (11, 3) and built == 0 and len(lowered) == 1  # the lambda


def test_remat_changes_nothing_but_memory():
    cond = jnp.asarray(np.random.default_rng(3).normal(size=(1, 16, 16, 16, 7)), jnp.float32)
    x = jnp.zeros((1, 16, 16, 16, 3))
    plain = DiffusionNet(7, features=SMALL_FEATURES, rngs=nnx.Rngs(7))
    remat = DiffusionNet(7, features=SMALL_FEATURES, remat=True, rngs=nnx.Rngs(7))

    t = jnp.array([5])
    np.testing.assert_allclose(_loss(plain, cond, x, t), _loss(remat, cond, x, t), rtol=1e-6)
    g1 = jax.tree.leaves(_grads(plain, cond, x, t))
    g2 = jax.tree.leaves(_grads(remat, cond, x, t))
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_maxpool_values_and_gradient_by_hand():
    from rediffinet_jax.models.denoiser import _maxpool2

    # distinct values: every 2x2x2 block's maximum is its voxel (1, 1, 1), so pooling picks x[:, 1::2, 1::2, 1::2]
    # and the gradient of the sum is 1 exactly there
    base = np.arange(2 * 4 * 6 * 4 * 3, dtype=np.float32).reshape(2, 4, 6, 4, 3)
    x = jnp.asarray(base)
    pooled = _maxpool2(x)
    np.testing.assert_array_equal(pooled, base[:, 1::2, 1::2, 1::2])
    grad = np.asarray(jax.grad(lambda v: jnp.sum(_maxpool2(v)))(x))
    expected = np.zeros_like(base)
    expected[:, 1::2, 1::2, 1::2] = 1
    np.testing.assert_array_equal(grad, expected)
    ref = jax.lax.reduce_window(-x, -jnp.inf, jax.lax.max, (1, 2, 2, 2, 1), (1, 2, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(_maxpool2(-x), ref)  # maxima at voxel (0, 0, 0) of each block


def test_instance_norm_by_hand_and_with_an_offset_channel():
    """Statistics from one pass (of the data shifted by one of its values) against NumPy's two-pass float64
    normalisation, on
    channels of mean 0, 10 and 300 (std 1-3), with the affine scale and shift applied."""
    from rediffinet_jax.models.layers import InstanceNorm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 12, 10, 8, 3)) * np.array([1.0, 2.0, 3.0]) + np.array([0.0, 10.0, 300.0])
    norm = InstanceNorm(3)
    norm.scale[...] = jnp.array([1.0, 0.5, 2.0])
    norm.bias[...] = jnp.array([0.0, 1.0, -1.0])
    got = np.asarray(norm(jnp.asarray(x, jnp.float32)))
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    ref = (x - mean) / np.sqrt(x.var(axis=(1, 2, 3), keepdims=True) + 1e-5) * [1.0, 0.5, 2.0] + [0.0, 1.0, -1.0]
    # E[x²] − E[x]² unshifted would be off by ~5e-3 in the third channel (mean/std = 100)
    np.testing.assert_allclose(got, ref, atol=3e-5)


def test_shared_encoder_features_equal_tiled_ones(small_diff):
    """The sampler's S samples share the encoder's features by broadcast: the same logits as when the features
    are copied per sample."""
    net = small_diff
    cond = jax.random.normal(jax.random.key(0), (1, 16, 16, 16, net.cond_channels))
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 16, 3))
    t = jnp.array([5, 500, 900])
    feats = nnx.jit(lambda m, c: m.encode(c))(net, cond)
    tiled = [jnp.broadcast_to(f, (3,) + f.shape[1:]) for f in feats]
    cond3 = jnp.broadcast_to(cond, (3,) + cond.shape[1:])
    denoise = nnx.jit(lambda m, *a: m.denoise(*a))  # one program for each features' shapes
    np.testing.assert_allclose(denoise(net, cond3, x, t, feats), denoise(net, cond3, x, t, tiled), atol=1e-6)
    with pytest.raises(ValueError, match="do not divide"):
        net.denoise(cond3[:2], x[:2], t[:2], [jnp.concatenate([f] * 3) for f in feats])
