"""Re-DiffiNet trained on more of the errors that matter: the same network, condition and target as
``configs/rediffinet.py`` (Δ = |U(I) − GT| from [I, U(I)]), with the training levers that helped on fold 0 of
the phantom benchmark, each measured alone (docs/decisions.md, "Training on the errors that matter").

python train.py --config configs/rediffinet_plus.py:bench --workdir runs/bench/seed_0
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.base()
    c.diffusion.update(model="rediffinet_plus")
    c = common.with_variant(arg, c)
    return plus(c)


def plus(c):
    """The levers kept, each of which made fold 0 of the phantom benchmark's seed 0 less wrong alone
    (applied after the size variant, so that demo/bench/smoke keep them): half the patches centred on U(I)'s
    errors, the loss without its Dice term, Min-SNR-5 weights, DDIM from an empty mask noised to t = 250. Not
    kept: the cascade augmentation of U(I) (more wrong flips alone) and an EMA of 0.99 (no change)."""
    c.diffusion.update(error_fraction=0.5, min_snr=5.0)
    c.diffusion.loss_weights = (0.0, 1.0, 1.0)
    c.diffusion.sampler.start = 250
    return c
