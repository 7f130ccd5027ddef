"""One process of the multi-host test (tests/test_multihost.py): trains 3 steps of the smoke U-Net.

    python tests/multihost_worker.py CACHE OUT [COORDINATOR NUM_PROCESSES PROCESS_ID]

Without coordinator arguments it takes them from the environment (JAX_COORDINATOR_ADDRESS, ...), and
without those runs as one process (with the test's two fake CPU devices).
Process 0 writes the final parameters to OUT/params.npz.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(cache, out, coordinator=None, num_processes=None, process_id=None):
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()
    from rediffinet_jax import parallel

    if coordinator:
        parallel.maybe_initialize_distributed(coordinator, int(num_processes), int(process_id))
    else:  # JAX_COORDINATOR_ADDRESS etc. if set (tests/processes.py run_distributed), else one process
        parallel.maybe_initialize_distributed()
    from pathlib import Path

    import jax
    import numpy as np

    from configs import common
    from rediffinet_jax.data.pipeline import CaseRef
    from rediffinet_jax.driver import ValCase
    from rediffinet_jax.stages import UNetStage
    from rediffinet_jax.training import Trainer

    refs = [CaseRef(p.name, str(p)) for p in sorted(Path(cache).iterdir()) if (p / "regions.npy").is_file()]
    val = [ValCase(refs[0].case_id, np.load(f"{refs[0].folder}/image.npy"), np.load(f"{refs[0].folder}/regions.npy"))]
    cfg = common.smoke(common.base()).unet
    cfg.update(steps=3, val_every=3, lr=3e-3)
    trainer = Trainer(UNetStage(cfg), progress=False)
    done = trainer.fit(Path(out) / "run", refs[1:], val, seed=0, log=lambda m: None)
    model = trainer.load(Path(out) / "run", "latest")
    from flax import nnx

    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    params = {jax.tree_util.keystr(p): parallel.to_host(v[...] if hasattr(v, "value") else v) for p, v in leaves}
    if jax.process_index() == 0:
        np.savez(Path(out) / "params.npz", **params)
    print(
        f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, run "
        f"{done['run']}, done",
        flush=True,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
