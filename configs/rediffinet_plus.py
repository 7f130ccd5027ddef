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
    """The levers kept (applied after the size variant, so that demo/bench/smoke keep them)."""
    c.diffusion.update(error_fraction=0.5)
    c.diffusion.unet_augment.update(p=0.4, max_radius=2, component_p=0.2)
    c.diffusion.loss_weights = (0.0, 1.0, 1.0)
    return c
