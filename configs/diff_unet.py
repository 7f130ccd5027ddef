"""Diff-U-Net: the diffusion model learns the GT regions conditioned on the image I alone.

python train.py --config configs/diff_unet.py --workdir runs/rd
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.base()
    c.diffusion.update(model="diff_unet")  # I -> GT (stages.VARIANTS)
    return common.with_variant(arg, c)
