import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rediffinet_jax import diffusion as D
from rediffinet_jax import losses
from rediffinet_jax.models.denoiser import DiffusionNet

SMALL_FEATURES = (8, 8, 16, 16, 32, 8)


def test_schedule():
    acp = D.alphas_cumprod()
    assert acp.dtype == np.float32 and acp.shape == (1000,)
    assert acp[-1] == pytest.approx(4.04e-5, rel=2e-3)  # the published ᾱ_999 ≈ 4.04e-5
    assert acp[0] == pytest.approx(1 - 1e-4, rel=1e-7)
    assert np.all(np.diff(acp) < 0)


def test_timestep_spacing():
    assert D.space_timesteps(1000, 10).tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    k50 = D.space_timesteps(1000, 50).tolist()
    assert k50[:6] == [0, 20, 41, 61, 82, 102] and k50[-3:] == [958, 979, 999] and len(k50) == 50
    assert D.space_timesteps(1000, 3).tolist() == [0, 500, 999]
    assert D.space_timesteps(1000, 1).tolist() == [999]
    assert D.space_timesteps(1000, 1000).tolist() == list(range(1000))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"\[1, 1000\]"):
            D.space_timesteps(1000, bad)


def test_q_sample_by_hand():
    x0, eps = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
    out = D.q_sample(x0, jnp.array([0, 999]), eps)
    a0, a999 = 1 - 1e-4, float(D.alphas_cumprod()[999])
    np.testing.assert_allclose(out[0], math.sqrt(a0) + 2 * math.sqrt(1 - a0), rtol=1e-5)
    np.testing.assert_allclose(out[1], math.sqrt(a999) + 2 * math.sqrt(1 - a999), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 10, 50, 1000])
def test_sampler_returns_true_x0(k):
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    x_T = jax.random.normal(jax.random.key(k), (3, 2, 4, 4, 3))
    out = D.ddim(lambda x, t: jnp.broadcast_to(x0, x.shape), x_T, D.space_timesteps(1000, k))
    np.testing.assert_allclose(out["x0_sum"][0] / 3, x0, atol=1e-6)


def test_k3_visits_999_500_0():
    seen = D.ddim(
        lambda x, t: jnp.full(x.shape, t / 999.0), jnp.zeros((1, 2)), D.space_timesteps(1000, 3), return_steps=True
    )["steps"]
    np.testing.assert_allclose(seen[:, 0, 0], [1.0, 500 / 999, 0.0], rtol=1e-6)


def test_k1_is_one_call_at_999():
    x_T = jax.random.normal(jax.random.key(0), (2, 5))
    calls = []

    def f(x, t):
        calls.append(1)
        return jnp.where(t == 999, 3.0 * x, 100.0)

    out = D.ddim(f, x_T, D.space_timesteps(1000, 1), return_steps=True)
    assert out["steps"].shape[0] == 1 and len(calls) == 1  # traced once inside a 1-step scan
    np.testing.assert_allclose(out["x0_sum"][0], jnp.sum(jnp.clip(3.0 * x_T, -1, 1), 0), rtol=1e-6)


def test_one_ddim_step_by_hand():
    """K = 2 (t = 999 then 0): f = 0.5 at t = 999 gives x = √ᾱ_0·0.5 + √(1−ᾱ_0)·ε̂; f = x at t = 0 returns it."""
    a999, a0 = float(D.alphas_cumprod()[999]), float(D.alphas_cumprod()[0])
    x = 0.3
    eps = (x / math.sqrt(a999) - 0.5) / math.sqrt(1 / a999 - 1)
    x1 = math.sqrt(a0) * 0.5 + math.sqrt(1 - a0) * eps
    out = D.ddim(lambda x_, t: jnp.where(t == 0, x_, 0.5), jnp.full((1, 1), x), [0, 999])
    assert float(out["x0_sum"][0, 0]) == pytest.approx(x1, rel=1e-5)  # the last step returns f = x


def test_suf_by_hand():
    """Two steps, two samples, one voxel: w_k = exp(sigmoid((k+1)/K)·(1 − u_k))."""
    logits = np.array([[0.0, 2.0], [-3.0, 0.5]])  # [step k (0 noisiest), sample]
    x0 = np.clip(logits, -1, 1)

    def sig(v):
        return 1 / (1 + math.exp(-v))

    expected = 0.0
    for k in range(2):
        p = max(sig(logits[k].mean()), 0.001)
        w = math.exp(sig((k + 1) / 2) * (1 + p * math.log(p)))
        expected += w * x0[k].sum()
    y, _ = D.fuse(jnp.asarray(x0.sum(1))[:, None], jnp.asarray(logits.sum(1))[:, None], 2, "suf")
    assert float(y[0]) == pytest.approx(expected, rel=1e-6)
    # the same through the sampler: a model that replays those logits step by step
    table = jnp.asarray(logits)
    out = D.ddim(
        lambda x, t: jnp.where(t == 999, table[0], table[1])[:, None], jnp.zeros((2, 1)), [0, 999], per_step=True
    )
    y2, _ = D.fuse(out["x0_sum"], out["logit_sum"], 2, "suf")
    assert float(y2[0]) == pytest.approx(expected, rel=1e-6)
    ym, _ = D.fuse(jnp.asarray([[0.5, -1.0]]), None, 2, "mean")
    np.testing.assert_allclose(ym, [0.25, -0.5])


def test_loss_by_hand():
    z = jnp.array([[[0.0], [2.0]]])  # [B=1, 2 voxels, C=1]
    m = jnp.array([[[0.0], [1.0]]])
    p1 = 1 / (1 + math.exp(-2))
    dice = 1 - (2 * p1 + 1e-5) / (0.5 + p1 + 1 + 1e-5)
    bce = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    mse = (0.25 + (1 - p1) ** 2) / 2
    loss, terms = losses.diffusion_loss(z, m)
    assert float(terms["dice"]) == pytest.approx(dice, rel=1e-5)
    assert float(terms["bce"]) == pytest.approx(bce, rel=1e-5)
    assert float(terms["mse"]) == pytest.approx(mse, rel=1e-5)
    assert float(loss) == pytest.approx(dice + bce + mse, rel=1e-5)
    loss2, _ = losses.diffusion_loss(z, m, weights=(1.0, 1.0, 0.0))
    assert float(loss2) == pytest.approx(dice + bce, rel=1e-5)


def test_xor_truth_table_and_targets():
    u = jnp.array([0, 0, 1, 1], jnp.uint8)
    d = jnp.array([0, 1, 0, 1], jnp.uint8)
    np.testing.assert_array_equal(D.refine(u, d), [0, 1, 1, 0])
    gt = jnp.array([0, 1, 1, 0], jnp.uint8)
    v = D.Variant("concat", "discrepancy")
    delta = v.target_mask(gt, u)
    np.testing.assert_array_equal(delta, [0, 1, 0, 1])
    np.testing.assert_array_equal(v.finish(delta, u), gt)  # a perfect Δ̂ gives back the truth


def test_condition_images():
    image = jnp.full((1, 2, 2, 2, 4), 10.0)
    unet = jnp.zeros((1, 2, 2, 2, 3), jnp.uint8).at[0, 0, 0, 0, 1].set(1)
    assert D.Variant("image", "mask").condition_image(image, None).shape[-1] == 4
    assert D.Variant("unet", "mask").condition_image(image, unet).shape[-1] == 3
    cc = D.Variant("concat", "mask").condition_image(image, unet)
    assert cc.shape[-1] == 7 and float(cc[0, 0, 0, 0, 5]) == 1.0
    mk = D.Variant("mask", "mask").condition_image(image, unet)
    assert float(mk[0, 0, 0, 0, 0]) == 10.0 and float(mk[0, 1, 1, 1, 0]) == pytest.approx(2.0)  # M′ = 0.2
    with pytest.raises(ValueError, match="channels"):
        D.Variant("image", "mask").condition_image(image[..., :3], None)
    with pytest.raises(ValueError, match="U-Net"):
        D.Variant("concat", "discrepancy").condition_image(image, None)
    with pytest.raises(ValueError, match="condition"):
        D.Variant("both", "mask")


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        D.check_sampler_args(0, 2, "mean", None)
    with pytest.raises(ValueError, match="S must be"):
        D.check_sampler_args(10, 0, "mean", None)
    with pytest.raises(ValueError, match="fusion"):
        D.check_sampler_args(10, 2, "median", None)
    with pytest.raises(ValueError, match="divide"):
        D.check_sampler_args(10, 4, "mean", 3)


VARIANTS = [("image", "mask"), ("unet", "mask"), ("concat", "mask"), ("mask", "mask"), ("concat", "discrepancy")]


@pytest.fixture(scope="module")
def tiny_batch():
    rng = np.random.default_rng(0)
    regions = (rng.uniform(size=(2, 16, 16, 16, 3)) > 0.7).astype(np.uint8)
    unet = (rng.uniform(size=(2, 16, 16, 16, 3)) > 0.7).astype(np.uint8)
    return {
        "image": jnp.asarray(rng.normal(size=(2, 16, 16, 16, 4)), jnp.float32),
        "regions": jnp.asarray(regions),
        "unet": jnp.asarray(unet),
    }


@pytest.mark.parametrize("condition,target", VARIANTS)
def test_variant_trains_and_samples(condition, target, tiny_batch):
    v = D.Variant(condition, target)
    model = DiffusionNet(v.cond_channels, features=SMALL_FEATURES, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch, key):
        def loss_fn(m):
            cond, x_t, t, mask = D.training_inputs(v, batch, key)
            return losses.diffusion_loss(m(cond, x_t, t), mask)[0]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    before = np.asarray(model.denoiser.out.kernel[...])
    loss = step(model, opt, tiny_batch, jax.random.key(1))
    assert np.isfinite(float(loss))
    assert not np.array_equal(before, np.asarray(model.denoiser.out.kernel[...]))
    cond = v.condition_image(tiny_batch["image"][:1], tiny_batch["unet"][:1])
    out = nnx.jit(lambda m, c, k: D.sample(m, c, k, steps=2, samples=2, fusion="suf", uncertainty=True))(
        model, cond, jax.random.key(2)
    )
    assert out["y"].shape == (1, 16, 16, 16, 3)
    assert out["uncertainty"].shape == (1, 16, 16, 16, 3)
    assert float(out["uncertainty"].min()) >= 0 and float(out["uncertainty"].max()) <= 1
    mask = v.finish(out["y"] > 0, tiny_batch["unet"][:1])
    assert mask.dtype == jnp.uint8


@pytest.fixture(scope="module")
def jitted_sampler():
    model = DiffusionNet(7, features=SMALL_FEATURES, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def run(state, cond, key):
        traces.append(1)
        return D.sample(
            nnx.merge(graphdef, state), cond, key, steps=3, samples=4, chunk=2, fusion="mean", return_steps=True
        )

    return run, state, traces


def test_sampler_no_retrace_and_seeded(jitted_sampler):
    run, state, traces = jitted_sampler
    cond = jnp.ones((1, 16, 16, 16, 7))
    a = run(state, cond, jax.random.key(0))
    b = run(state, cond * 0.5, jax.random.key(1))
    c = run(state, cond, jax.random.key(0))
    assert len(traces) == 1
    np.testing.assert_array_equal(a["y"], c["y"])  # seeded: reproduces exactly
    assert not np.array_equal(a["y"], b["y"])
    assert a["steps"].shape == (3, 4, 1, 16, 16, 16, 3)
    # mean fusion = mean over the S samples of the last step's clipped x̂0
    np.testing.assert_allclose(a["y"], a["steps"][-1].mean(0), atol=1e-6)


class _TanhModel:
    """Stands in for a DiffusionNet: logits 0.5·tanh(x_t), inside [−1, 1] so x̂0 = the raw logits."""

    def encode(self, cond):
        return []

    def denoise(self, cond, x, t, feats):
        return 0.5 * jnp.tanh(x)


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunked_suf_uses_the_mean_over_all_samples(chunk):
    """SUF weights need μ_k over all S samples: rebuilt by hand from every step's x̂0 (= logits here)."""
    cond = jnp.zeros((1, 2, 2, 2, 4))
    out = jax.jit(
        lambda c, k: D.sample(_TanhModel(), c, k, steps=3, samples=4, chunk=chunk, fusion="suf", return_steps=True)
    )(cond, jax.random.key(7))
    st = np.asarray(out["steps"], np.float64)  # [K, S, B, ...]
    mu = st.mean(1)
    p = np.maximum(1 / (1 + np.exp(-mu)), 0.001)
    k = np.arange(3).reshape(3, 1, 1, 1, 1, 1)
    w = np.exp(1 / (1 + np.exp(-(k + 1) / 3)) * (1 + p * np.log(p)))
    np.testing.assert_allclose(out["y"], (w * st.sum(1)).sum(0), rtol=1e-5)


def test_min_snr_weights_by_hand():
    a0, a999 = 1 - 1e-4, float(D.alphas_cumprod()[999])
    w = D.min_snr_weights(jnp.array([0, 999]), 5.0)
    assert float(w[0]) == 1.0  # SNR_0 ≈ 9999, capped at γ
    assert float(w[1]) == pytest.approx(a999 / (1 - a999) / 5.0, rel=1e-5)
    assert float(D.snr(jnp.array(0))) == pytest.approx(a0 / (1 - a0), rel=1e-3)


def test_weighted_loss_is_a_weighted_mean_over_the_batch():
    """Weights (1, 0): every term is sample 0's term over B = 2."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(2, 4, 4, 4, 3)), jnp.float32)
    m = jnp.asarray(rng.uniform(size=(2, 4, 4, 4, 3)) > 0.5, jnp.float32)
    _, alone = losses.diffusion_loss(z[:1], m[:1])
    loss, terms = losses.diffusion_loss(z, m, sample_weights=jnp.array([1.0, 0.0]))
    for k in ("dice", "bce", "mse"):
        assert float(terms[k]) == pytest.approx(float(alone[k]) / 2, rel=1e-5)
    assert float(loss) == pytest.approx(sum(float(v) for v in alone.values()) / 2, rel=1e-5)


class _StepModel:
    """x̂0 = t / 999 everywhere, and every x it is given kept (to see the sampler's first input)."""

    def __init__(self):
        self.seen = []

    def encode(self, cond):
        return []

    def denoise(self, cond, x, t, feats):
        return jnp.broadcast_to((t / 999.0).astype(jnp.float32)[:, None, None, None, None], x.shape)


def test_sdedit_start_visits_0_to_start_from_no_discrepancy_noised():
    cond = jnp.zeros((1, 2, 2, 2, 7))
    out = jax.jit(lambda c, k: D.sample(_StepModel(), c, k, steps=3, samples=2, start=500, return_steps=True))(
        cond, jax.random.key(3)
    )
    np.testing.assert_allclose(np.asarray(out["steps"])[:, 0, 0, 0, 0, 0, 0], [500 / 999, 250 / 999, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="start"):
        D.check_sampler_args(3, 2, "mean", None, start=1000)
    with pytest.raises(ValueError, match=r"\[1, 2\]"):  # K = 3 steps cannot fit in [0, 1]
        D.check_sampler_args(3, 2, "mean", None, start=1)


def test_sdedit_first_input_is_the_empty_mask_noised_to_start():
    """One step from t = 500: x̂0 = x_start itself for a model returning its input; x_start must be
    √ᾱ_500·(−1) + √(1 − ᾱ_500)·ε with ε the sampler's own noise (one chunk: key split once)."""

    class Echo(_StepModel):
        def denoise(self, cond, x, t, feats):
            return x

    key = jax.random.key(5)
    out = D.sample(Echo(), jnp.zeros((1, 2, 2, 2, 7)), key, steps=1, samples=1, start=500, return_steps=True)
    eps = jax.random.normal(jax.random.split(key, 1)[0], (1, 1, 2, 2, 2, 3), jnp.float32)
    a = float(D.alphas_cumprod()[500])
    np.testing.assert_allclose(out["steps"][0, 0], np.clip(-np.sqrt(a) + np.sqrt(1 - a) * eps[0], -1, 1), atol=1e-6)


def test_direct_variant_inputs_and_prediction(tiny_batch):
    v = D.Variant("concat", "discrepancy", "direct")
    cond, x_t, t, m = D.training_inputs(v, tiny_batch, jax.random.key(0))
    assert not np.asarray(x_t).any() and not np.asarray(t).any()
    np.testing.assert_array_equal(m, np.abs(np.asarray(tiny_batch["unet"], np.float32) - tiny_batch["regions"]))

    class Fixed:
        def __call__(self, cond, x, t):
            return jnp.stack(
                [jnp.zeros(x.shape[:-1]), jnp.full(x.shape[:-1], math.log(3.0)), -jnp.ones(x.shape[:-1])], -1
            )

    out = D.predict_direct(Fixed(), cond[:1], uncertainty=True)
    np.testing.assert_allclose(out["y"][0, 0, 0, 0], [0.0, 0.5, 2 / (1 + math.e) - 1], rtol=1e-6)
    np.testing.assert_allclose(
        out["uncertainty"][0, 0, 0, 0, 1], -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)), rtol=1e-6
    )
    with pytest.raises(ValueError, match="process"):
        D.Variant("concat", "discrepancy", "one-step")
