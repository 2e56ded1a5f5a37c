"""Data-parallel training across processes: torchrun + DistributedDataParallel, gloo on CPU, nccl on CUDA.

    torchrun --nproc_per_node 2 -m nnforge.cli train image --data DIR    # or: nnforge train image --data DIR --nproc 2
    # several machines: torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:29400 --nproc_per_node N -m nnforge.cli

The global batch is the config's batch_size whatever the number of processes: every process walks the same epoch
order and takes its slice of each batch (rows rank, rank + world, ...), DDP averages the gradients, so the step is
the one a single process would take over the whole batch (BatchNorm statistics excepted: each process normalises
its own slice). Only rank 0 writes the run folder, logs and checkpoints; a stop asked of any process (SIGTERM,
Ctrl-C) stops all of them at the same step, and every process sees the same metrics, so NaN and early stopping
decide the same everywhere. One process (no torchrun) is world 1, and all of this costs nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import timedelta

import torch
from torch import nn


class World:
    """This process's place among the training processes."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """DDP around a trained module (its gradients averaged over the processes at backward)."""
        if not self.distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # buffers (BatchNorm's running statistics) follow rank 0's, so every process validates the same model
        return DistributedDataParallel(module, device_ids=ids)

    def shard(self, batch):
        """This process's rows of a global batch (a tensor, or a tuple/list of them along dim 0)."""
        if not self.distributed:
            return batch
        if isinstance(batch, torch.Tensor):
            return batch[self.rank::self.size]
        if isinstance(batch, tuple | list):
            return type(batch)(self.shard(b) for b in batch)
        return batch

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the processes (a copy; `t` is left as it was)."""
        if not self.distributed:
            return t
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop asked of one process stops them all)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's object, on every process."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_WORLD = World()


def world() -> World:
    return _WORLD


def setup(device_name: str) -> World:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) once; one process
    without torchrun is world 1. On CUDA each process takes the GPU of its local rank."""
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _WORLD
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    _WORLD = World(dist.get_rank(), dist.get_world_size())
    return _WORLD


def teardown() -> None:
    """Leave the process group while the interpreter is still whole. Left to interpreter shutdown, the last gloo
    work objects were freed on gloo's own threads, which need the GIL to drop their tensors and cannot get it once
    Python is finalizing: the process aborted ("terminate called without an active exception") after a finished
    run, now and then (about 1 run in 10 under load). Destroying the group and collecting the DDP wrapper that holds it
    (a reference cycle) here ends those threads first."""
    global _WORLD
    if not _WORLD.distributed:
        return
    import gc

    import torch.distributed as dist

    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _WORLD = World()
    gc.collect()


def device_for(world_: World, name: str) -> str:
    """The device name a process trains on: its local GPU under torchrun on CUDA."""
    if world_.distributed and torch.cuda.is_available() and name in ("auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def relaunch(nproc: int, argv: list[str]) -> int:
    """`nnforge ... --nproc N`: the same command under torchrun, N processes on this machine; its exit status."""
    args = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
            and not a.startswith("--nproc=")]
    runner = shutil.which("torchrun")
    cmd = ([runner] if runner else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", f"--nproc_per_node={nproc}", "-m", "nnforge.cli", *args]
    print(f"nnforge: {nproc} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd)
