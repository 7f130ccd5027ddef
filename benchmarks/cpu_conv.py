"""CPU convolution formulations side by side, with PyTorch (2 threads) when it is installed.

    python benchmarks/cpu_conv.py                     # convs at 64³, denoiser forward, U-Net train step
    python benchmarks/cpu_conv.py --skip_models       # the single layers only
    python benchmarks/cpu_conv.py --all_formulations  # also the formulations measured and not used

Layers (forward and forward+backward): a 3³ convolution 16→16 and 64→64 at 64³, a strided one 32→64
(64³ → 32³), a k2 s2 transposed convolution 32→32 and 128→128 (32³ → 64³); each in XLA's native form
(``xla``), the package's CPU path (rediffinet_jax.models.layers), the GPUs' (``2d_sum``, stride-1 only: the
others are the CPU's) and, with ``--all_formulations``, the
depth taps on the inputs at stride 1, im2col with one matrix product, and one matrix product per tap.
Models: the whole denoiser forward and a stage-1 train step (U-Net, batch 1) at 64³ with each
``REDIFFINET_CONV``. Prints JAX/PyTorch ratios. PyTorch is an optional extra for this script only,
never a runtime dependency.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rediffinet_jax import compiling  # noqa: E402
from rediffinet_jax.models import layers  # noqa: E402


def best_of(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _shifted(x, k, stride):
    """The k³ shifted (strided) slices of ``x`` padded by (k − 1)/2, each ``[B, Do, Ho, Wo, C]``."""
    p = (k - 1) // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
    n = [(s + 2 * p - k) // stride + 1 for s in x.shape[1:4]]
    return [
        xp[
            :,
            i : i + stride * (n[0] - 1) + 1 : stride,
            j : j + stride * (n[1] - 1) + 1 : stride,
            m : m + stride * (n[2] - 1) + 1 : stride,
        ]
        for i in range(k)
        for j in range(k)
        for m in range(k)
    ]


def im2col(x, w, stride):
    """All k³ shifted slices stacked on channels, one matrix product (measured, not used)."""
    k, c = w.shape[0], w.shape[3]
    cols = jnp.stack(_shifted(x, k, stride), axis=-2)  # [B, Do, Ho, Wo, k³, C]
    return cols.reshape(*cols.shape[:4], k**3 * c) @ w.reshape(k**3 * c, -1)


def shifted_matmuls(x, w, stride):
    """One matrix product per kernel tap, summed (measured, not used)."""
    k = w.shape[0]
    taps = w.reshape(k**3, *w.shape[3:])
    return sum(s @ taps[t] for t, s in enumerate(_shifted(x, k, stride)))


# (row label, function of (x, kernel, stride)) for the 3³ convolution rows
CONV_FORMULATIONS = {
    "xla": lambda x, w, s: layers.conv3d(x, w, s, 1, "xla"),
    "2d (package)": lambda x, w, s: layers.conv3d(x, w, s, 1, "2d"),
    "2d_sum (GPUs)": lambda x, w, s: layers.conv3d(x, w, s, 1, "2d_sum"),
    "2d taps on inputs": lambda x, w, s: layers._depth_taps_on_inputs(x, w, s, 1),
    "im2col": im2col,
    "27 matmuls": shifted_matmuls,
}


def jax_layer_times(kind, cin, cout, size, stride, fn, repeats):
    """Best forward and forward+backward (input and kernel gradients) times of one layer."""
    x = jax.random.normal(jax.random.key(0), (1, size, size, size, cin))
    if kind == "conv":
        w = jax.random.normal(jax.random.key(1), (3, 3, 3, cin, cout)) * 0.05
        layer = lambda x, w: fn(x, w, stride)  # noqa: E731
    else:
        x = x[:, : size // 2, : size // 2, : size // 2]
        w = jax.random.normal(jax.random.key(1), (2, 2, 2, cin, cout)) * 0.05
        layer = fn
    # compiling.jit (XLA_OPTIONS) only at the top level: JAX refuses compiler options on a nested jit
    f = compiling.jit(layer)
    g = compiling.jit(jax.grad(lambda x, w: jnp.sum(layer(x, w) ** 2), argnums=(0, 1)))
    return (
        best_of(lambda: jax.block_until_ready(f(x, w)), repeats),
        best_of(lambda: jax.block_until_ready(g(x, w)), repeats),
    )


def torch_layer_times(kind, cin, cout, size, stride, repeats, channels_last):
    import torch

    torch.set_num_threads(2)
    if kind == "conv":
        m = torch.nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        x = torch.randn(1, cin, size, size, size)
    else:
        m = torch.nn.ConvTranspose3d(cin, cout, 2, stride=2, bias=False)
        x = torch.randn(1, cin, size // 2, size // 2, size // 2)
    if channels_last:
        m = m.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            m(x)

    def fwd_bwd():
        m.zero_grad()
        (m(x) ** 2).sum().backward()

    return best_of(fwd, repeats), best_of(fwd_bwd, repeats)


def model_times(size, repeats, impl, tiny):
    """Denoiser forward and U-Net train step seconds with ``REDIFFINET_CONV=impl`` (restored after)."""
    saved = os.environ.get("REDIFFINET_CONV")
    os.environ["REDIFFINET_CONV"] = impl
    try:
        return _model_times(size, repeats, tiny)
    finally:
        if saved is None:
            del os.environ["REDIFFINET_CONV"]
        else:
            os.environ["REDIFFINET_CONV"] = saved


def _model_times(size, repeats, tiny):
    from flax import nnx

    from rediffinet_jax.losses import soft_dice_bce
    from rediffinet_jax.models.denoiser import FEATURES, DiffusionNet
    from rediffinet_jax.models.unet import UNet

    feats = (8, 8, 16, 32, 64, 8) if tiny else FEATURES
    filters = (8, 16, 32, 64) if tiny else (32, 64, 128, 256, 320)
    net = DiffusionNet(7, 3, feats, rngs=nnx.Rngs(0))
    gd, st = nnx.split(net)
    cond = jax.random.normal(jax.random.key(0), (1, size, size, size, 7))
    x = jax.random.normal(jax.random.key(1), (1, size, size, size, 3))
    den = compiling.jit(lambda st, c, x: nnx.merge(gd, st)(c, x, jnp.array([500])))
    t_den = best_of(lambda: jax.block_until_ready(den(st, cond, x)), repeats)
    unet = UNet(5, filters, deep_supervision=1, rngs=nnx.Rngs(0))
    ugd, ust = nnx.split(unet)
    img = jax.random.normal(jax.random.key(2), (1, size, size, size, 5))
    tgt = (jax.random.uniform(jax.random.key(3), (1, size, size, size, 3)) > 0.9).astype(jnp.float32)

    @compiling.jit
    def step(st, img, tgt):
        def loss(p):
            return sum(soft_dice_bce(o, tgt) for o in nnx.merge(ugd, p)(img, train=True))

        g = jax.grad(loss)(st)
        return jax.tree.map(lambda a, b: a - 1e-4 * b, st, g)

    t_step = best_of(lambda: jax.block_until_ready(step(ust, img, tgt)), repeats)
    return t_den, t_step, filters, feats


def _torch_block(ci, co, stride, bias, slope):
    """Two 3×3×3 convolutions, each with an affine instance norm and a leaky ReLU (PyTorch)."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv3d(ci, co, 3, stride, 1, bias=bias),
        nn.InstanceNorm3d(co, affine=True),
        nn.LeakyReLU(slope),
        nn.Conv3d(co, co, 3, 1, 1, bias=bias),
        nn.InstanceNorm3d(co, affine=True),
        nn.LeakyReLU(slope),
    )


def _torch_denoiser(f):
    """The denoiser's convolutions and norms in PyTorch, widths ``f`` (time MLP left out: negligible)."""
    import torch
    import torch.nn as nn

    class Den(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList(
                [_torch_block(10, f[0], 1, True, 0.1)] + [_torch_block(f[i], f[i + 1], 1, True, 0.1) for i in range(4)]
            )
            ups = [
                (f[4], f[3], f[3], True),
                (f[3], f[2], f[2], True),
                (f[2], f[1], f[1], True),
                (f[1], f[0], f[5], False),
            ]
            self.ups = nn.ModuleList([nn.ConvTranspose3d(ci, ci // 2 if h else ci, 2, 2) for ci, _, _, h in ups])
            self.dec = nn.ModuleList(
                [_torch_block(cs + (ci // 2 if h else ci), co, 1, True, 0.1) for ci, cs, co, h in ups]
            )
            self.out = nn.Conv3d(f[5], 3, 1)

        def forward(self, x):
            skips = []
            for i, b in enumerate(self.enc):
                x = b(x if i == 0 else nn.functional.max_pool3d(x, 2))
                skips.append(x)
            x = skips.pop()
            for up, dec in zip(self.ups, self.dec):
                x = dec(torch.cat([skips.pop(), up(x)], 1))
            return self.out(x)

    return Den()


def _torch_unet(fl):
    """The U-Net's convolutions and norms in PyTorch, widths ``fl`` (5 input channels, 3 outputs)."""
    import torch
    import torch.nn as nn

    class UN(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList(
                [
                    _torch_block(c, f, 1 if i == 0 else 2, False, 0.01)
                    for i, (c, f) in enumerate(zip((5,) + fl[:-1], fl))
                ]
            )
            self.ups = nn.ModuleList([nn.ConvTranspose3d(fl[i + 1], fl[i], 2, 2) for i in range(len(fl) - 1)])
            self.dec = nn.ModuleList([_torch_block(2 * fl[i], fl[i], 1, False, 0.01) for i in range(len(fl) - 1)])
            self.head = nn.Conv3d(fl[0], 3, 1)

        def forward(self, x):
            skips = []
            for b in self.enc:
                x = b(x)
                skips.append(x)
            x = skips.pop()
            for i in reversed(range(len(self.dec))):
                x = self.dec[i](torch.cat([self.ups[i](x), skips[i]], 1))
            return self.head(x)

    return UN()


def torch_model_times(size, repeats, filters, feats):
    """The same two workloads in PyTorch, channels-last 3-D, 2 threads."""
    import torch
    import torch.nn as nn

    torch.set_num_threads(2)
    cl = torch.channels_last_3d
    den = _torch_denoiser(feats).to(memory_format=cl)
    x = torch.randn(1, 10, size, size, size).to(memory_format=cl)

    def fwd():
        with torch.no_grad():
            den(x)

    un = _torch_unet(filters).to(memory_format=cl)
    opt = torch.optim.SGD(un.parameters(), 1e-4)
    img = torch.randn(1, 5, size, size, size).to(memory_format=cl)
    tgt = (torch.rand(1, 3, size, size, size) > 0.9).float()

    def step():
        opt.zero_grad()
        z = un(img)
        p = torch.sigmoid(z)
        loss = (1 - 2 * (p * tgt).sum() / (p.sum() + tgt.sum())) + nn.functional.binary_cross_entropy_with_logits(
            z, tgt
        )
        loss.backward()
        opt.step()

    return best_of(fwd, repeats), best_of(step, repeats)


def layer_rows(a, have_torch: bool) -> list[tuple]:
    """(workload, formulation, forward s, forward+backward s, PyTorch channels-last's pair or None) per layer."""
    rows = []
    layer_cases = [
        ("conv", 16, 16, 1),
        ("conv", 64, 64, 1),
        ("conv", 32, 64, 2),
        ("convT", 32, 32, 2),
        ("convT", 128, 128, 2),
    ]
    for kind, cin, cout, stride in layer_cases:
        name = f"{kind} {cin}->{cout}{' s2' if kind == 'conv' and stride == 2 else ''} @{a.size}^3"
        ref = torch_layer_times(kind, cin, cout, a.size, stride, a.repeats, True) if have_torch else None
        if kind == "conv":
            forms = (
                CONV_FORMULATIONS
                if a.all_formulations
                else {k: CONV_FORMULATIONS[k] for k in ("xla", "2d (package)", "2d_sum (GPUs)")}
            )
        else:
            forms = {
                impl: (lambda impl: lambda x, w: layers.conv_transpose3d(x, w, 2, impl))(impl)  # noqa: B023
                for impl in ("xla", "2d")  # 2d_sum is 2d here
            }
        for label, fn in forms.items():
            rows.append((name, label, *jax_layer_times(kind, cin, cout, a.size, stride, fn, a.repeats), ref))
        if have_torch:
            rows.append(
                (name, "torch NCDHW", *torch_layer_times(kind, cin, cout, a.size, stride, a.repeats, False), ref)
            )
            rows.append((name, "torch channels-last", *ref, ref))
    return rows


def print_model_rows(a, have_torch: bool) -> None:
    """The denoiser's forward and the U-Net's train step with each convolution formulation (and PyTorch's)."""
    print(f"\n{'model workload @' + str(a.size) + '^3':40s} {'impl':8s} {'seconds':>8s} {'/torch':>7s}")
    tor = None
    for impl in layers.CONV_IMPLS:
        t_den, t_step, filters, feats = model_times(a.size, a.repeats, impl, a.tiny)
        if have_torch and tor is None:
            tor = torch_model_times(a.size, a.repeats, filters, feats)
        for name, t, k in ((f"denoiser forward {feats}", t_den, 0), (f"U-Net train step {filters}", t_step, 1)):
            print(f"{name:40s} {impl:8s} {t:8.3f} {t / tor[k] if tor else float('nan'):7.2f}")
    if tor:
        print(
            f"{'denoiser forward':40s} {'torch':8s} {tor[0]:8.3f}\n{'U-Net train step':40s} {'torch':8s} {tor[1]:8.3f}"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_models", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny widths for the whole-model rows")
    p.add_argument(
        "--all_formulations",
        action="store_true",
        help="also the formulations measured and not used (taps on inputs at stride 1, im2col, 27 matmuls)",
    )
    a = p.parse_args()
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    print(f"jax {jax.__version__} on {jax.default_backend()}; PyTorch {'installed' if have_torch else 'not installed'}")
    rows = layer_rows(a, have_torch)
    print(f"{'workload':28s} {'impl':20s} {'fwd s':>8s} {'fwd+bwd s':>10s} {'fwd/torch':>10s} {'f+b/torch':>10s}")
    for name, impl, f, fb, ref in rows:
        r = f"{f / ref[0]:10.2f} {fb / ref[1]:10.2f}" if ref else ""
        print(f"{name:28s} {impl:20s} {f:8.3f} {fb:10.3f} {r}")
    if not a.skip_models:
        print_model_rows(a, have_torch)


if __name__ == "__main__":
    main()
