"""Trains the two-stage pipeline (see configs/ for the experiments).

python train.py --config configs/rediffinet.py:demo --workdir runs/demo
python train.py --config configs/rediffinet.py --workdir runs/rd --config.data.root=/data/BraTS2023
"""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", "configs/rediffinet.py", "Experiment config file (path[:arg]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Work directory (created; a second run resumes it).", required=True)
flags.DEFINE_integer("fold", None, "Run this fold only.")
flags.DEFINE_enum("stage", None, ["unet", "diffusion"], "Run this stage only (diffusion needs stage 1 done).")
flags.DEFINE_bool("overwrite", False, "Retrain a stage whose saved settings differ from the config.")
flags.DEFINE_bool("evaluate", True, "Score the held-out folds when training is done.")
flags.DEFINE_integer("stop_after", None, "Stop after this many training steps of this run (like an interruption).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from rediffinet_jax import cli

    cli.train(
        FLAGS.config,
        FLAGS.workdir,
        fold=FLAGS.fold,
        stage=FLAGS.stage,
        overwrite=FLAGS.overwrite,
        evaluate=FLAGS.evaluate,
        stop_after=FLAGS.stop_after,
    )


def parse_flags(argv):
    from rediffinet_jax import cli

    return cli.parse_flags(argv, FLAGS, "configs/rediffinet.py")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
