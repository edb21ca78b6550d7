"""Run by test_parallel.py under torchrun: load each checkpoint at model-parallel size MP and save
every rank's states on tiny.tokens() as OUT/{i}.{key}.rank{r}.npy.

    torchrun --nproc_per_node 2 tests/torchrun_worker.py OUT MP CKPT [CKPT ...]
"""
import os
import sys

import numpy as np


from tiny import tokens

from llama.checkpoint import load_model
from llama.dist import setup, teardown


def main(out, mp, *paths):
    d = setup(int(mp), "cpu")
    try:
        for i, path in enumerate(paths):
            states = load_model(path, d).model(tokens(), logits=True)
            for key, v in states.items():
                np.save(os.path.join(out, f"{i}.{key}.rank{d.rank}.npy"), v.numpy())
    finally:
        teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
