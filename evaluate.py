"""Scores the held-out folds of a work directory and writes the paper's tables and figures.

python evaluate.py --workdir runs/demo
python evaluate.py --workdir runs/rd --models rediffinet --folds 0,1 --checkpoint latest
python evaluate.py --workdir runs/rd --fusion suf --samples 4    # Diff-UNet's fusion, beside the default
python evaluate.py --workdir runs/demo --scorer official          # the official BraTS package's numbers too
"""

from absl import app, flags

from rediffinet_jax.diffusion import FUSIONS
from rediffinet_jax.metrics import CONVENTIONS

flags.DEFINE_string("workdir", None, "Work directory of train.py.", required=True)
flags.DEFINE_list("models", None, "Models to score besides the U-Net baseline (default: all trained).")
flags.DEFINE_list("folds", None, "Folds to score (default: all).")
flags.DEFINE_enum(
    "checkpoint",
    None,
    ["best", "latest"],
    "Which checkpoint of each fold (default: the run's eval.checkpoint, else latest).",
)
flags.DEFINE_enum("fusion", None, list(FUSIONS), "Sampler fusion (default: each model's diffusion.sampler).")
flags.DEFINE_integer("steps", None, "DDIM steps K (default: each model's).", lower_bound=1)
flags.DEFINE_integer("samples", None, "Samples S per window (default: each model's).", lower_bound=1)
flags.DEFINE_integer(
    "start",
    None,
    "DDIM's first timestep (default: each model's, 999); lower starts from 'no discrepancy' noised to it.",
    lower_bound=0,
    upper_bound=999,
)
flags.DEFINE_bool(
    "gate",
    None,
    "Also score each discrepancy refiner with its gate chosen on the other folds (default: the run's eval.gate, "
    "on); --nogate scores it as the paper does only.",
)
flags.DEFINE_enum(
    "convention",
    None,
    list(CONVENTIONS),
    "Convention of our scores (default: the run's eval.convention, else brats2023); brats2025 follows the "
    "current official package's rules.",
)
flags.DEFINE_enum(
    "scorer",
    "ours",
    ["ours", "official"],
    "official: also run the official BraTS package (pip install -e '.[official]') on the label maps, its numbers "
    "beside ours.",
)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from rediffinet_jax import cli

    cli.evaluate(
        FLAGS.workdir,
        FLAGS.models,
        FLAGS.folds,
        FLAGS.checkpoint,
        FLAGS.convention,
        {"fusion": FLAGS.fusion, "steps": FLAGS.steps, "samples": FLAGS.samples, "start": FLAGS.start},
        FLAGS.scorer,
        FLAGS.gate,
    )


def parse_flags(argv):
    from rediffinet_jax import cli

    return cli.parse_flags(argv, FLAGS)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
