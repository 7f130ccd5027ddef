"""UA-Diffusion: the diffusion model learns the GT regions conditioned on U(I), [I, U(I)] or I ∘ M′.

python train.py --config configs/ua_diffusion.py:concat --workdir runs/rd
python train.py --config configs/ua_diffusion.py:unet,demo --workdir runs/demo
"""

from configs import common

INPUTS = ("unet", "concat", "mask")


def get_config(arg: str | None = None):
    parts = (arg or "concat").split(",")
    which, rest = parts[0], (parts[1] if len(parts) > 1 else None)
    if which not in INPUTS:
        raise ValueError(f"ua_diffusion input must be one of {INPUTS}, got {which!r}")
    c = common.base()
    c.diffusion.update(model=f"ua_{which}")  # U(I), [I, U(I)] or I ∘ M′ -> GT (stages.VARIANTS)
    return common.with_variant(rest, c)
