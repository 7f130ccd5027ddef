"""Segments new cases (BraTS-style case folders, or flat <case>-t1n.nii.gz ... files) into label maps.

python predict.py -i cases/ -o out/ --workdir runs/demo
python predict.py -i cases/ -o out/ --workdir runs/rd --model rediffinet --folds 0,1,2,3,4 --save_uncertainty
python predict.py -i cases/ --baseline masks/ -o out/ --workdir runs/x   # refine another model's masks
"""

from absl import app, flags

flags.DEFINE_string("input", None, "Folder of cases.", short_name="i", required=True)
flags.DEFINE_string("output", None, "Folder for <case>.nii.gz label maps.", short_name="o", required=True)
flags.DEFINE_string("workdir", None, "Work directory of train.py.", required=True)
flags.DEFINE_string("model", "rediffinet", "Refiner to apply after the U-Net ('unet' for the U-Net alone).")
flags.DEFINE_list("folds", None, "Fold models to ensemble (default: all).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint of each fold.")
flags.DEFINE_bool("save_probabilities", False, "Also write the U-Net probabilities.")
flags.DEFINE_bool("save_uncertainty", False, "Also write the refiner's per-voxel uncertainty.")
flags.DEFINE_string(
    "baseline",
    None,
    "Folder of another model's <case>.nii.gz label maps to refine (refiners trained on baseline.maps).",
)
flags.DEFINE_bool(
    "gate",
    True,
    "Keep only the flips the refiner's gate allows (chosen by evaluate.py on all folds' held-out cases); "
    "--nogate keeps every flip, as the paper does. With --model unet: its post-processing (small components "
    "removed as evaluate.py chose); --nogate: none.",
)
flags.DEFINE_enum(
    "labels",
    "input",
    ["input", "2023", "2021"],
    "Label convention of the maps written: each case's own (input: ET = 4 for a BraTS 2018-2021 case), or "
    "2023 (ET = 3) / 2021 (ET = 4) for all.",
)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from rediffinet_jax import cli

    cli.predict(
        FLAGS.input,
        FLAGS.output,
        FLAGS.workdir,
        FLAGS.model,
        FLAGS.folds,
        FLAGS.checkpoint,
        FLAGS.save_probabilities,
        FLAGS.save_uncertainty,
        FLAGS.baseline,
        FLAGS.gate,
        FLAGS.labels,
    )


def parse_flags(argv):
    from rediffinet_jax import cli

    return cli.parse_flags(argv, FLAGS)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
