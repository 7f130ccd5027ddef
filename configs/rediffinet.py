"""Re-DiffiNet: the diffusion model learns Δ = |U(I) − GT| conditioned on [I, U(I)].

python train.py --config configs/rediffinet.py --workdir runs/rd --config.data.root=/data/BraTS2023
python train.py --config configs/rediffinet.py:demo --workdir runs/demo    # phantoms, CPU, minutes
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.base()
    c.diffusion.update(model="rediffinet")  # [I, U(I)] -> Δ (stages.VARIANTS)
    return common.with_variant(arg, c)
