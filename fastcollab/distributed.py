"""Scale out on ``torchrun`` (DESIGN §8): the process group, exact shards, gathers, and rank-0 writes.

Every helper is a no-op in a single process, so the trainer calls them unconditionally:

- :func:`init_from_env` joins the process group that ``torchrun`` describes in ``WORLD_SIZE`` / ``RANK`` /
  ``MASTER_ADDR`` (gloo on CPUs, NCCL on GPUs); a group that is already up (``init_process_group`` with a
  ``file://`` rendezvous, as the tests do) is used as it is.
- :func:`shard_bounds` cuts ``n`` rows into ``world`` contiguous slices whose sizes differ by at most one: no
  row is dropped or repeated (no DistributedSampler-style padding), so sharded results are the single-process
  results, not an approximation of them.
- :func:`gather_rows` concatenates every rank's per-example results in rank order (uneven shards allowed: the
  padding used for transport is cut away), :func:`weighted_mean` all-reduces metrics weighted by each rank's
  number of examples.
- :func:`on_main` runs a write on rank 0 only and then waits at a barrier, so no rank reads a file before it
  is complete.

A run killed on any rank: ``torchrun`` ends the other ranks when one exits; the rank that failed prints its one
``error:`` line (errors found before training are the same on every rank and are printed by rank 0 only).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
from typing import Any, Callable

import torch
import torch.distributed as dist

from .errors import FastcollabError

#: how long a collective waits for a missing rank before the run ends with an error
TIMEOUT = datetime.timedelta(minutes=30)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> bool:
    """Join torchrun's process group (if launched by it and not yet joined); True when this process started
    it (and so should end it with :func:`shutdown`)."""
    if dist.is_initialized() or not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise FastcollabError("this PyTorch build has no torch.distributed: run without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    signal.signal(signal.SIGTERM, _stopped)  # torchrun ends the other ranks with SIGTERM when one fails
    return True


def lost_a_rank(error: BaseException) -> bool:
    """Did a collective fail because another rank is gone (killed, crashed)?"""
    text = str(error)
    return is_distributed() and (isinstance(error, getattr(dist, "DistError", ())) or "gloo" in text
                                 or "NCCL" in text or "Connection reset by peer" in text)


def _stopped(signum, frame):
    """SIGTERM from torchrun (another rank ended): leave like Ctrl-C, through the trainer's one-line exit."""
    raise KeyboardInterrupt


def shutdown(started: bool) -> None:
    if started and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and device.index is None and is_distributed():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def seed_per_rank(seed: int) -> None:
    """Per-rank random streams (attack starts, evaluation starts): rank r draws from ``seed + r``."""
    if is_distributed():
        torch.manual_seed(int(seed) + rank())


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that rank ``rank`` of ``world`` owns: contiguous, sizes differ by <= 1."""
    return n * rank // world, n * (rank + 1) // world


def my_shard(n: int) -> slice:
    return slice(*shard_bounds(n, rank(), world_size()))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def on_main(write: Callable[[], Any]) -> None:
    """Run ``write`` on rank 0 only, then wait until it is done everywhere."""
    if is_main():
        write()
    barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; small objects only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's rows of ``t`` concatenated in rank order (shards may differ in length; trailing shapes
    and dtypes must agree). One all_gather of the lengths, one of the padded rows; padding is cut away."""
    if not is_distributed():
        return t
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def weighted_mean(values: dict[str, float], weight: float) -> dict[str, float]:
    """``Σ_r w_r·v_r / Σ_r w_r`` of every value over the ranks (one all_reduce); ``weight`` is this rank's
    number of examples, so a mean over examples stays the mean over all examples of all ranks."""
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) * weight for k in keys] + [float(weight)], dtype=torch.float64)
    dist.all_reduce(flat)
    return {k: float(v) for k, v in zip(keys, flat[:-1] / flat[-1])}


@contextlib.contextmanager
def quiet_unless_main():
    """Ranks other than 0 print nothing on stdout inside the block (rank 0 speaks for the run)."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield
