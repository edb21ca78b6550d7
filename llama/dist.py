"""Process groups: torchrun's environment (or a single process), gloo on CPU, nccl on CUDA."""
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from .errors import LlamaError


@dataclass
class Dist:
    rank: int  # global rank
    world: int
    mp: int  # model-parallel size
    mp_rank: int  # which shard this rank loads
    dp: int  # number of data-parallel groups (world // mp)
    dp_rank: int  # which slice of the data this rank's group takes
    device: torch.device

    @property
    def is_main(self) -> bool:  # the one rank that prints
        return self.rank == 0

    @property
    def is_writer(self) -> bool:  # one rank per model-parallel group writes
        return self.mp_rank == 0


def setup(mp: int = 0, device: str = "auto") -> Dist:
    """Join (or create) the process group and split it into model-parallel groups of size `mp`
    (0: the whole world). Works under `torchrun` (any number of nodes) and as a plain process."""
    if device not in ("auto", "cpu", "cuda"):
        raise LlamaError(f"unknown device {device!r} (auto, cpu or cuda)")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise LlamaError("--device cuda asked for, but torch sees no CUDA device")
    if use_cuda:  # before the process group, so NCCL binds each rank to its own GPU
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("nccl" if use_cuda else "gloo")
        else:
            fd, path = tempfile.mkstemp(prefix="llama-pg-")
            os.close(fd)
            os.unlink(path)
            dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"file://{path}",
                                    rank=0, world_size=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    mp = mp or world
    if mp < 1 or world % mp:
        raise LlamaError(f"model-parallel size {mp} does not divide the world size {world}")
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(mp)
    elif fs_init.get_model_parallel_world_size() != mp:
        have = fs_init.get_model_parallel_world_size()
        raise LlamaError(f"model parallelism already set up with size {have}, not {mp}")
    return Dist(rank, world, mp, fs_init.get_model_parallel_rank(), world // mp,
                fs_init.get_data_parallel_rank(), dev)


def teardown():
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def owned_group() -> Iterator[None]:
    """Around a command's work: a process group that does not exist when it starts is torn down
    when it ends (even on an error); a caller's (the notebook API, a test, another command) is
    left alone. The one place every command's set-up and teardown go through."""
    own = not dist.is_initialized()
    try:
        yield
    finally:
        if own:
            teardown()


@contextmanager
def session(mp: int = 0, device: str = "auto") -> Iterator[Dist]:
    """`with session(mp, device) as proc:` setup() inside owned_group()."""
    with owned_group():
        yield setup(mp, device)
