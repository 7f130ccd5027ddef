"""The baseline: the optimized U-Net alone (stage 1 and its out-of-fold predictions).

python train.py --config configs/baseline_unet.py --workdir runs/rd
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.base()
    c.stages = "unet"
    return common.with_variant(arg, c)
