"""One process of tests/test_multihost.py's failure test: process 1 meets a bad case while process 0
waits for it in a collective (as when one host cannot read a file the others can).

    JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=k python tests/failing_worker.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    from rediffinet_jax import cli, parallel

    parallel.maybe_initialize_distributed()
    import jax

    from rediffinet_jax.errors import CaseError

    with cli._guard():
        parallel.barrier("both started")  # the collectives are set up: process 0 then waits on a live peer
        if jax.process_index() == 1:
            time.sleep(1)
            raise CaseError("cannot read NIfTI (test)", case="BraTS-GLI-00042-000", path="x-t1n.nii.gz")
        parallel.barrier("never passed")
    print("passed a barrier that process 1 never reached", flush=True)


if __name__ == "__main__":
    main()
