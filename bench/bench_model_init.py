"""Building the model-parallel Transformer three ways, side by side in the same processes: fairscale's
default initialisation (xavier on a full-size master matrix per weight, split on every rank), an
identity init method (Meta's reference code: the full-size master is still allocated and split), and
ours (fairscale's initialisation skipped; the loader fills every weight).

    torchrun --nproc_per_node 2 bench/bench_model_init.py [--dim 2048] [--layers 8] [--vocab 32000]
"""
import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fairscale.nn.model_parallel import layers as fs_layers  # noqa: E402

from llama import model as M  # noqa: E402
from llama.dist import setup, teardown  # noqa: E402


def build(args, how: str) -> float:
    init, ctx = fs_layers._initialize_affine_weight, M.uninitialised
    if how != "ours":
        M.uninitialised = contextlib.nullcontext
    if how == "identity":
        def identity(w, out_f, in_f, part, dim, _, *rest, **kw):
            return init(w, out_f, in_f, part, dim, lambda x: x, *rest, **kw)

        fs_layers._initialize_affine_weight = identity
    try:
        t = time.perf_counter()
        M.Transformer(args)
        return time.perf_counter() - t
    finally:
        fs_layers._initialize_affine_weight, M.uninitialised = init, ctx


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    d = setup(0, "cpu")
    args = M.ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 128, vocab_size=a.vocab)
    times = {how: min(build(args, how) for _ in range(a.repeats)) for how in ("fairscale", "identity", "ours")}
    if d.is_main:
        print(f"mp {d.mp}, dim {a.dim}, {a.layers} layers, vocab {a.vocab}, best of {a.repeats}: "
              + ", ".join(f"{how} {t:.3f} s" for how, t in times.items())
              + f"; ours is {times['identity'] / times['ours']:.0f}x faster than the identity init")
    teardown()


if __name__ == "__main__":
    main()
