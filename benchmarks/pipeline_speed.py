"""Patches of 128³ per second from cached full-size cases, with grain worker processes.

    python benchmarks/pipeline_speed.py --workers 2 --cases 4 --batches 20

Generates full-size (240×240×155) phantoms once into /tmp/rediffinet_bench, caches them, then times
batches of 2 patches after a warm-up batch.
"""

import argparse
import time

import absl.flags

from rediffinet_jax.data import brats, phantoms, pipeline


def main():
    absl.flags.FLAGS.mark_as_parsed()  # grain workers need parsed flags
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--root", default="/tmp/rediffinet_bench")
    a = p.parse_args()
    phantoms.write_dataset(f"{a.root}/data", a.cases, (240, 240, 155), seed=0, progress=True)
    cases = brats.discover_cases(f"{a.root}/data")
    refs = pipeline.prepare_cache(cases, f"{a.root}/cache", "zscore_rescale")
    ds = pipeline.train_dataset(refs, (128, 128, 128), 2, seed=0, num_workers=a.workers)
    it = iter(ds)
    next(it)
    t0 = time.perf_counter()
    for _ in range(a.batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    print(
        f"{2 * a.batches / dt:.1f} patches of 128³/s with {a.workers} workers "
        f"({a.batches} batches of 2, augmentations on)"
    )


if __name__ == "__main__":
    main()
