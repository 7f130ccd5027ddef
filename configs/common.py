"""Shared defaults: the paper's values (docs/method.md). Each experiment file adjusts the ``diffusion`` block.

Steps are not given in the paper; the defaults here (stage 1: 25k steps of batch 2, stage 2: 50k steps
of batch 4) are ours, in the range Diff-UNet and the NVIDIA recipe train for.
"""

from ml_collections import ConfigDict


def _data() -> ConfigDict:
    """Where the cases come from and how they are read, cropped, split and loaded."""
    return ConfigDict(
        dict(
            root="",  # empty: generate phantoms into <workdir>/data
            normalization="zscore_rescale",
            old_brats=False,
            allow_empty_modality=False,
            spacing=(),  # mm per axis to resample to after cropping (CPUs: (2.0, 2.0, 2.0)); empty: the source's
            n_folds=5,
            split_seed=0,
            num_workers=2,
            phantoms=ConfigDict(dict(n_cases=50, shape=(240, 240, 155), seed=0, hard=False, tumour_scale=1.0)),
        )
    )


def _unet(augment: dict) -> ConfigDict:
    """Stage 1: the U-Net (nnU-Net's BraTS widths), its training and its sliding window."""
    return ConfigDict(
        dict(
            filters=(64, 96, 128, 192, 256, 384, 512),
            deep_supervision=2,
            foreground_channel=True,
            dtype="float32",
            remat=False,
            patch=(128, 128, 128),
            batch=2,
            steps=25_000,
            lr=3e-4,
            weight_decay=1e-4,
            warmup_frac=0.02,
            foreground_fraction=0.4,
            augment=ConfigDict(augment),
            val_every=1000,
            val_cases=0,
            keep=2,
            overlap=0.5,
            batch_windows=1,
        )
    )


def _diffusion(augment: dict) -> ConfigDict:
    """Stage 2: the refiner (``model``: a variant of stages.VARIANTS), its training and its sampler."""
    return ConfigDict(
        dict(
            model="rediffinet",  # one of stages.VARIANTS: what is conditioned on and learned
            features=(64, 64, 128, 256, 512, 64),
            dtype="float32",
            remat=False,
            patch=(128, 192, 128),
            batch=4,
            steps=50_000,
            lr=1e-4,
            weight_decay=1e-4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            warmup_frac=0.15,
            clip_norm=0.0,
            # Diff-UNet's augmentations (flips, intensity scale/shift 0.1), which Re-DiffiNet's code builds on,
            # not the U-Net's NVIDIA set: see README, "Decisions"
            loss_weights=(1.0, 1.0, 1.0),
            foreground_fraction=0.4,
            # training on more of the errors that matter (configs/rediffinet_plus.py; 0: as the paper):
            # the share of patches centred on a voxel where U(I) is wrong, nnU-Net's cascade augmentation of
            # U(I) (pipeline.UnetAugment), the decay of an EMA of the weights, Min-SNR-γ loss weights
            error_fraction=0.0,
            unet_augment=ConfigDict(dict(p=0.0, max_radius=2, component_p=0.0)),
            ema=0.0,
            min_snr=0.0,
            augment=ConfigDict(dict(augment, nvidia=False, zoom_p=0.0)),
            val_every=2000,
            val_cases=0,
            keep=2,
            overlap=0.5,
            batch_windows=1,
            # chunk: samples denoised at once. 2 of the paper's 10 ran as fast as all 10 on an H200 in a third
            # of the memory (docs/benchmarks.md, "On a GPU")
            # start: DDIM's first timestep; < 999 starts from "no discrepancy" noised to it (SDEdit)
            sampler=ConfigDict(dict(steps=10, samples=10, fusion="mean", chunk=2, start=999)),
            val_sampler=ConfigDict(dict(steps=10, samples=1)),
        )
    )


def base() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.data = _data()
    augment = dict(flip_p=0.5, scale_shift=0.1, nvidia=True, nvidia_p=0.15, zoom_p=0.15, zoom_max=1.4)
    c.unet = _unet(augment)
    c.diffusion = _diffusion(augment)
    # checkpoint: each fold's last one. Validation runs on the fold's held-out cases, so "best" would pick
    # the checkpoint on the very cases it is then scored on (and conditioned on, for stage 2's U(I)).
    # gate: refiners are also scored with a per-region gate chosen on the other folds (gate.py)
    c.eval = ConfigDict(dict(convention="brats2023", lesion_wise=True, checkpoint="latest", gate=True))
    c.stages = "all"  # all | unet (stage 1 and out-of-fold predictions only)
    # maps: a folder of another model's out-of-fold label maps (<case>.nii.gz), used as U(I) in place of
    # stage 1's U-Net, which is then not trained (docs/baseline_maps.md)
    c.baseline = ConfigDict(dict(maps=""))
    return c


def demo(c: ConfigDict) -> ConfigDict:
    """The whole pipeline on generated phantoms, minutes on a 2-core CPU: 3 folds (every fold of its split:
    10 training and 5 held-out cases each), tiny widths; a check that everything runs, not a result (the
    phantom benchmark, ``bench``, is the result)."""
    c.data.phantoms.update(n_cases=15, shape=(48, 48, 40))
    c.data.update(num_workers=0, n_folds=3)
    c.unet.update(
        filters=(8, 16, 32, 64),
        deep_supervision=1,
        patch=(32, 32, 32),
        batch=2,
        steps=250,
        warmup_frac=0.1,
        lr=1e-2,
        val_every=250,
        val_cases=2,
        batch_windows=2,
    )
    c.diffusion.update(
        features=(8, 8, 16, 32, 64, 8),
        patch=(32, 32, 32),
        batch=2,
        steps=400,
        lr=2e-3,
        val_every=400,
        val_cases=2,
        batch_windows=2,
    )
    c.diffusion.sampler.update(steps=3, samples=2)
    c.diffusion.val_sampler.update(steps=2, samples=1)
    c.eval.lesion_wise = True
    return c


def bench(c: ConfigDict) -> ConfigDict:
    """The phantom benchmark (benchmarks/refinement.py): a strong stage 1 on hard phantoms (vessels,
    choroid plexus, satellites, broken rims, fading edema: ``data/mimics.py``), 5 folds, both stages and
    the evaluation within 45 minutes on a 2-core CPU."""
    c = demo(c)
    c.data.n_folds = 5
    c.data.phantoms.update(n_cases=25, shape=(64, 64, 48), hard=True, tumour_scale=1.5)
    c.unet.update(steps=1000, val_every=1000)
    c.diffusion.update(steps=1000, val_every=1000)
    c.diffusion.sampler.update(steps=3, samples=4)
    return c


def real(c: ConfigDict) -> ConfigDict:
    """The real-data benchmark (``benchmarks/refinement.py --data real``): 20 BraTS exams at 2 mm
    (``data.spacing``; scores on the source's 1 mm grid), 5 folds of 16/4, the U-Net, one refiner and the
    evaluation within 60 minutes on a 2-core CPU. ``data.root``: the cases (``benchmarks/real_data.py``)."""
    c = bench(c)
    c.data.update(spacing=(2.0, 2.0, 2.0))
    # 2000 steps: fold 0's Dice avg 42.5 at 1000, 49.7 at 3000 (benchmarks/unet_curve.py, docs/benchmarks.md);
    # 3000 (6.3 steps/s: 8 min a fold) would not leave the refiner and the evaluation their part of the hour
    c.unet.update(steps=2000, val_every=2000)
    return c


def smoke(c: ConfigDict) -> ConfigDict:
    """The tiny run of the tests: 6 phantoms, 2 folds, a few steps."""
    c = demo(c)
    c.data.n_folds = 2
    c.data.phantoms.update(n_cases=6, shape=(40, 40, 36))
    c.unet.update(
        filters=(4, 8, 16), deep_supervision=1, patch=(16, 16, 16), steps=4, val_every=2, val_cases=1, batch=2
    )
    c.diffusion.update(features=(4, 4, 8, 8, 16, 4), patch=(16, 16, 16), steps=4, val_every=2, val_cases=1)
    c.diffusion.sampler.update(steps=2, samples=2)
    c.diffusion.val_sampler.update(steps=1, samples=1)
    return c


def with_variant(arg: str | None, c: ConfigDict) -> ConfigDict:
    """Applies a ``demo``, ``bench``, ``real`` or ``smoke`` argument (after the file's own choices)."""
    if not arg:
        return c
    if arg == "demo":
        return demo(c)
    if arg == "smoke":
        return smoke(c)
    if arg == "bench":
        return bench(c)
    if arg == "real":
        return real(c)
    raise ValueError(f"unknown config argument {arg!r}; use demo, bench, real or smoke")
