"""The deterministic control: Re-DiffiNet's network, inputs and target (Δ from [I, U(I)]) trained as a one-step
predictor (x_t = 0, t = 0, no sampling), gated the same way: what the diffusion adds over a plain second stage.

python train.py --config configs/control.py:bench --workdir runs/bench/seed_0
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.base()
    c.diffusion.update(model="control")
    return common.with_variant(arg, c)
