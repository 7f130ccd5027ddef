"""Diffusion for masks (docs/method.md): schedule, q_sample, variants, training inputs, DDIM, fusion, refinement.

Masks m ∈ {0, 1} enter the diffusion as x0 = 2m − 1; the network predicts x0 as raw logits
(sign > 0 ↔ m = 1). Arrays are channels-last, region channels [WT, TC, ET].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TIMESTEPS = 1000
CONDITIONS = ("image", "unet", "concat", "mask")
TARGETS = ("mask", "discrepancy")
PROCESSES = ("diffusion", "direct")  # direct: the same network as a one-step predictor (the control)
MASK_BACKGROUND_WEIGHT = 0.2  # M′ outside the U-Net masks, for the `mask` condition


# ----------------------------------------------------------------------------- schedule


@functools.cache
def alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """ᾱ_t = Π_{s≤t}(1 − β_s), betas linear from beta_start to beta_end, computed in float64, float32 out."""
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    out = np.cumprod(1.0 - betas).astype(np.float32)
    out.flags.writeable = False
    return out


def space_timesteps(num_timesteps: int, k: int) -> np.ndarray:
    """The K timesteps of guided-diffusion's ``space_timesteps(num_timesteps, [K])``, ascending.

    K = 1 (which guided-diffusion cannot build) means the single step t = num_timesteps − 1.
    """
    if not 1 <= k <= num_timesteps:
        raise ValueError(f"sampling steps K must be in [1, {num_timesteps}], got {k}")
    if k == 1:
        return np.array([num_timesteps - 1])
    stride = (num_timesteps - 1) / (k - 1)
    return np.array([round(i * stride) for i in range(k)])  # Python round, as guided-diffusion


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, acp: jax.Array | None = None) -> jax.Array:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. x0, noise ``[B, ...]``; t ``[B]`` int."""
    acp = jnp.asarray(alphas_cumprod() if acp is None else acp)
    a = acp[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


# ----------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """What the encoder sees (``condition``) and what the diffusion learns (``target``).

    condition: image (I), unet (U(I)), concat ([I, U(I)]) or mask (I ∘ M′); target: mask (GT regions)
    or discrepancy (Δ = |U(I) − GT|, then refined = U(I) XOR Δ̂).
    """

    condition: str = "concat"
    target: str = "discrepancy"
    process: str = "diffusion"
    n_modalities: int = 4

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"unknown condition {self.condition!r}; choose one of {CONDITIONS}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose one of {TARGETS}")
        if self.process not in PROCESSES:
            raise ValueError(f"unknown process {self.process!r}; choose one of {PROCESSES}")

    @property
    def direct(self) -> bool:
        """A one-step predictor: x_t = 0 and t = 0 in training and prediction, no sampling."""
        return self.process == "direct"

    @property
    def uses_unet(self) -> bool:
        return self.condition != "image" or self.target == "discrepancy"

    @property
    def cond_channels(self) -> int:
        return {"image": self.n_modalities, "unet": 3, "concat": self.n_modalities + 3, "mask": self.n_modalities}[
            self.condition
        ]

    def condition_image(self, image: jax.Array, unet: jax.Array | None) -> jax.Array:
        """Encoder input ``[B, D, H, W, cond_channels]`` float32 from image ``[..., 4]`` and U(I) ``[..., 3]``."""
        if image.shape[-1] != self.n_modalities:
            raise ValueError(f"image has {image.shape[-1]} channels, expected {self.n_modalities}")
        if self.condition == "image":
            return image.astype(jnp.float32)
        if unet is None:
            raise ValueError(f"condition {self.condition!r} needs the U-Net masks U(I)")
        u = unet.astype(jnp.float32)
        if self.condition == "unet":
            return u
        if self.condition == "concat":
            return jnp.concatenate([image.astype(jnp.float32), u], axis=-1)
        weight = jnp.where(jnp.any(u > 0, axis=-1, keepdims=True), 1.0, MASK_BACKGROUND_WEIGHT)
        return image.astype(jnp.float32) * weight

    def target_mask(self, regions: jax.Array, unet: jax.Array | None) -> jax.Array:
        """The mask m ``[..., 3]`` float32 in {0, 1} the diffusion learns."""
        if self.target == "mask":
            return regions.astype(jnp.float32)
        return jnp.abs(unet.astype(jnp.float32) - regions.astype(jnp.float32))

    def finish(self, fused_mask: jax.Array, unet: jax.Array | None) -> jax.Array:
        """The final region masks (uint8) from the fused mask: itself, or U(I) XOR Δ̂ for discrepancies."""
        fused_mask = fused_mask.astype(jnp.uint8)
        return refine(unet, fused_mask) if self.target == "discrepancy" else fused_mask


def refine(unet: jax.Array, delta: jax.Array) -> jax.Array:
    """Re-DiffiNet refinement: flip the U-Net's voxels where the predicted discrepancy is 1 (XOR)."""
    return jnp.bitwise_xor(unet.astype(jnp.uint8), delta.astype(jnp.uint8))


# ----------------------------------------------------------------------------- training inputs


def snr(t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of timesteps ``t`` (int, any shape), float32."""
    a = jnp.asarray(alphas_cumprod())[t]
    return a / (1.0 - a)


def min_snr_weights(t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-γ loss weights for an x0-predicting model, min(SNR_t, γ)/γ per sample ``[B]`` (Hang et al.
    2023, divided by γ so that low-noise steps weigh 1): the noisiest steps, where x0 cannot be known,
    stop dominating the gradient."""
    return jnp.minimum(snr(t), gamma) / gamma


def training_inputs(variant: Variant, batch: dict, key: jax.Array):
    """Draws t ~ U{0..999} and ε ~ N(0, I) per sample; returns (cond, x_t, t, m) for one training step.
    A direct variant gets x_t = 0 and t = 0 (nothing to denoise: it predicts m from the condition alone).

    batch: ``image`` ``[B, D, H, W, 4]``, ``regions`` ``[B, D, H, W, 3]``, ``unet`` (if the variant uses it).
    """
    unet = batch.get("unet")
    m = variant.target_mask(batch["regions"], unet)
    if variant.direct:
        t = jnp.zeros((m.shape[0],), jnp.int32)
        return variant.condition_image(batch["image"], unet), jnp.zeros_like(m), t, m
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (m.shape[0],), 0, NUM_TIMESTEPS)
    x_t = q_sample(2.0 * m - 1.0, t, jax.random.normal(k_eps, m.shape, jnp.float32))
    return variant.condition_image(batch["image"], unet), x_t, t, m


# ----------------------------------------------------------------------------- sampler


def suf_weights(mean_logits: jax.Array, num_steps: int) -> jax.Array:
    """Step-uncertainty weights ``[K, ...]`` from the per-step sample mean of the raw logits ``[K, ...]``
    (k = 0 the noisiest): w_k = exp(sigmoid((k+1)/K)·(1 − u_k)), u_k = −p·ln p, p = max(sigmoid μ_k, 0.001)."""
    p = jnp.maximum(jax.nn.sigmoid(mean_logits), 0.001)
    u = -p * jnp.log(p)
    k = jnp.arange(num_steps, dtype=jnp.float32).reshape((-1,) + (1,) * (mean_logits.ndim - 1))
    return jnp.exp(jax.nn.sigmoid((k + 1) / num_steps) * (1.0 - u))


def _fuse_mean(x0_sum: jax.Array, logit_sum, samples: int):
    """x0_sum ``[1, ...]`` = Σ_s x̂0 of the last step; Y = x0_sum / S (the released Re-DiffiNet test)."""
    y = x0_sum[-1] / samples
    return y, y


def _fuse_suf(x0_sum: jax.Array, logit_sum: jax.Array, samples: int):
    """x0_sum, logit_sum ``[K, ...]`` = Σ_s over samples per step; Y = Σ_k w_k·Σ_s x̂0_{s,k} (Diff-UNet's
    step-uncertainty fusion, :func:`suf_weights`)."""
    w = suf_weights(logit_sum / samples, x0_sum.shape[0])
    y = jnp.sum(w * x0_sum, 0)
    return y, y / (samples * jnp.sum(w, 0))


@dataclasses.dataclass(frozen=True)
class Fusion:
    """How S samples become one fused value Y (mask = Y > 0).

    per_step: whether it needs every step's sums over the samples (x̂0 and raw logits), or only the last x̂0.
    fuse: ``(x0_sum, logit_sum or None, S) -> (Y, Y normalised to [−1, 1])``.
    """

    per_step: bool
    fuse: Callable


#: The fusions by name; the command lines offer exactly these.
FUSIONS = {"mean": Fusion(False, _fuse_mean), "suf": Fusion(True, _fuse_suf)}


def fuse(x0_sum: jax.Array, logit_sum: jax.Array | None, samples: int, fusion: str) -> tuple[jax.Array, jax.Array]:
    """Fuses S samples with the fusion named ``fusion`` (:data:`FUSIONS`); returns (Y, Y normalised to [−1, 1])."""
    return FUSIONS[fusion].fuse(x0_sum, logit_sum, samples)


def ddim(model_fn, x_T: jax.Array, timesteps, per_step: bool = False, return_steps: bool = False) -> dict:
    """DDIM (η = 0) from pure noise, as one ``lax.scan`` over the K steps, noisiest first.

    model_fn(x ``[S, ...]``, t scalar int32) -> raw x0 logits ``[S, ...]``; x_T ``[S, ...]``.
    Returns sums over the S samples (so chunks of samples can be added before :func:`fuse`):
    ``x0_sum`` — Σ_s clipped x̂0, of the last step ``[1, ...]``, or of every step ``[K, ...]`` with
    ``per_step`` (then also ``logit_sum`` ``[K, ...]``); ``steps`` — every x̂0 ``[K, S, ...]`` if asked.
    """
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError("timesteps must be a non-empty 1-D list")
    acp = alphas_cumprod()
    desc = ts[::-1]
    # ᾱ_k and ᾱ_{k−1} from the noisiest step down (ᾱ_{−1} = 1 at the last step).
    a_now = jnp.asarray(acp[desc])
    a_prev = jnp.asarray(np.concatenate([acp[desc[1:]], [1.0]]).astype(np.float32))

    def step(x, inputs):
        t, a, ap = inputs
        logits = model_fn(x, t).astype(jnp.float32)
        x0 = jnp.clip(logits, -1.0, 1.0)
        eps = (x / jnp.sqrt(a) - x0) / jnp.sqrt(1.0 / a - 1.0)
        x_next = jnp.sqrt(ap) * x0 + jnp.sqrt(1.0 - ap) * eps
        out = {"x0_sum": jnp.sum(x0, 0)} if per_step else {}
        if per_step:
            out["logit_sum"] = jnp.sum(logits, 0)
        if return_steps:
            out["steps"] = x0
        return x_next, out

    x_last, outs = jax.lax.scan(step, x_T.astype(jnp.float32), (jnp.asarray(desc.astype(np.int32)), a_now, a_prev))
    if not per_step:  # the last step returns x̂0 itself (ᾱ_{−1} = 1)
        outs["x0_sum"] = jnp.sum(x_last, 0)[None]
    return outs


def fused_probability(y_norm: jax.Array) -> jax.Array:
    """Maps a fused value normalised to [−1, 1] to a probability: (y + 1)/2."""
    return jnp.clip((y_norm + 1.0) / 2.0, 0.0, 1.0)


def binary_entropy(p: jax.Array) -> jax.Array:
    """Per-voxel uncertainty in bits: −p·log2 p − (1−p)·log2(1−p), 0 at p ∈ {0, 1}, 1 at p = 0.5."""
    p = jnp.clip(p, 1e-7, 1 - 1e-7)
    return -(p * jnp.log2(p) + (1 - p) * jnp.log2(1 - p))


FIRST_T = NUM_TIMESTEPS - 1  # DDIM's usual first timestep: pure noise (the paper's sampler)


def sampler_start(sampler) -> int:
    """A sampler config's first timestep (``start``; older configs have none: :data:`FIRST_T`)."""
    return getattr(sampler, "start", FIRST_T)


def sampler_settings(sampler) -> dict:
    """What a sampler config changes in a refiner's output: fusion, steps, samples and ``start`` (only when it
    is not :data:`FIRST_T`, so that records written before it existed still match)."""
    out = {k: sampler[k] for k in ("fusion", "steps", "samples")}
    if sampler_start(sampler) != FIRST_T:
        out["start"] = sampler_start(sampler)
    return out


def check_sampler_args(steps: int, samples: int, fusion: str, chunk: int | None, start: int = NUM_TIMESTEPS - 1) -> int:
    """Validates K, S, fusion, chunk and the first timestep; returns the chunk size actually used (a divisor
    of S)."""
    if not 0 <= start < NUM_TIMESTEPS:
        raise ValueError(f"sampler start must be in [0, {NUM_TIMESTEPS - 1}], got {start}")
    space_timesteps(start + 1, steps)
    if samples < 1:
        raise ValueError(f"number of samples S must be >= 1, got {samples}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {sorted(FUSIONS)}")
    chunk = samples if not chunk else min(chunk, samples)
    if samples % chunk:
        raise ValueError(f"sample chunk {chunk} must divide the number of samples {samples}")
    return chunk


def _chunk_denoiser(model, cond: jax.Array, chunk: int):
    """``model_fn(x [chunk, B, ...], t)`` -> x0 logits for ``chunk`` samples of each of the B windows at
    once, the encoder run once on ``cond`` ``[B, ...]`` and its features shared by every sample and step."""
    feats = model.encode(cond)
    b = cond.shape[0]

    def tile(a):  # [B, ...] -> [chunk·B, ...], sample-major
        return jnp.broadcast_to(a[None], (chunk,) + a.shape).reshape((chunk * b,) + a.shape[1:])

    cond_c = tile(cond)  # the features stay [B, ...]: the denoiser broadcasts them (a copy per sample is GiBs)

    def model_fn(x, t):  # x [chunk, B, ...]
        flat = x.reshape((chunk * b,) + x.shape[2:])
        z = model.denoise(cond_c, flat, jnp.full((chunk * b,), t, jnp.int32), feats)
        return z.reshape(x.shape)

    return model_fn


def sample(
    model,
    cond: jax.Array,
    key: jax.Array,
    steps: int = 10,
    samples: int = 10,
    fusion: str = "mean",
    chunk: int | None = None,
    return_steps: bool = False,
    uncertainty: bool = False,
    start: int = NUM_TIMESTEPS - 1,
) -> dict:
    """Samples S masks per condition image with DDIM and fuses them (call it inside ``jax.jit``).

    model: a :class:`~rediffinet_jax.models.denoiser.DiffusionNet`; cond ``[B, D, H, W, Cc]``.
    The encoder runs once; the S samples run as a batch, ``chunk`` samples at a time (sequentially) to
    cap memory. ``start`` < 999 starts DDIM at that timestep from an empty mask (x0 = −1: "no
    discrepancy") noised to it, over K steps spaced in [0, start] (SDEdit): a voxel flips only where the
    model finds evidence. Returns ``y`` — the fused value Y ``[B, D, H, W, 3]`` (mask = Y > 0; in [−1, 1]
    for ``mean``, the weighted sum for ``suf``), ``y_norm`` — Y normalised to [−1, 1] (the fused
    probability is (y_norm + 1)/2) — plus ``uncertainty`` (binary entropy in bits of that probability)
    and ``steps`` (every step's x̂0, ``[K, S, B, ...]``) when asked. Sliding windows blend Y.
    """
    chunk = check_sampler_args(steps, samples, fusion, chunk, start)
    ts = space_timesteps(start + 1, steps)
    out_shape = cond.shape[:-1] + (3,)
    model_fn = _chunk_denoiser(model, cond, chunk)
    per_step = FUSIONS[fusion].per_step
    t0 = jnp.full((chunk,), start, jnp.int32)

    def run_chunk(k):
        noise = jax.random.normal(k, (chunk,) + out_shape, jnp.float32)
        x_T = noise if start == NUM_TIMESTEPS - 1 else q_sample(-jnp.ones_like(noise), t0, noise)
        return ddim(model_fn, x_T, ts, per_step, return_steps)

    keys = jax.random.split(key, samples // chunk)
    if len(keys) == 1:
        outs = jax.tree.map(lambda a: a[None], run_chunk(keys[0]))
    else:
        outs = jax.lax.map(run_chunk, keys)
    y, y_norm = fuse(jnp.sum(outs["x0_sum"], 0), jnp.sum(outs["logit_sum"], 0) if per_step else None, samples, fusion)
    result = {"y": y, "y_norm": y_norm}
    if uncertainty:
        result["uncertainty"] = binary_entropy(fused_probability(y_norm))
    if return_steps:  # [n_chunks, K, chunk, B, ...] -> [K, S, B, ...]
        st = jnp.moveaxis(outs["steps"], 0, 1)
        result["steps"] = st.reshape((st.shape[0], samples) + st.shape[3:])
    return result


def predict_direct(model, cond: jax.Array, uncertainty: bool = False) -> dict:
    """The direct variant's prediction (one forward pass, x_t = 0, t = 0), in :func:`sample`'s terms:
    ``y`` = ``y_norm`` = 2·sigmoid(z) − 1 (so Y > 0 ⇔ z > 0 and the probability is sigmoid(z))."""
    b = cond.shape[0]
    z = model(cond, jnp.zeros(cond.shape[:-1] + (3,), jnp.float32), jnp.zeros((b,), jnp.int32)).astype(jnp.float32)
    y = 2.0 * jax.nn.sigmoid(z) - 1.0
    result = {"y": y, "y_norm": y}
    if uncertainty:
        result["uncertainty"] = binary_entropy(jax.nn.sigmoid(z))
    return result
