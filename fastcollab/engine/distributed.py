"""The two ways a cohort step runs on several processes (DESIGN §8), planned from the method's declarations.

**data-parallel** (the default under torchrun): every rank holds the whole cohort and takes its exact shard
of each batch from the loader's per-epoch plan (:meth:`fastcollab.data.DeviceLoader.set_shard`). The step is
the single-process engine's step (eager or the CPU fast path) on the shard; the only collectives are:

- right before a trainable peer's optimizer steps (an optimizer step pre-hook), one all_reduce of that peer's
  gradients, each rank's weighted by its number of examples: ``Σ_r b_r·∇L_r / Σ_r b_r`` is exactly the
  gradient of the full-batch mean loss (every method's loss is a mean over examples);
- right after it steps, one all_reduce of the peer's BatchNorm running statistics, weighted the same way
  (averaged, not broadcast: the average of the ranks' running means is the full-batch running mean; the
  running variances miss the spread between shards, so with BN a step matches the single-process one within
  a tolerance, without BN up to float rounding).

We average gradients explicitly instead of wrapping peers in ``DistributedDataParallel``: DDP's reducer
hooks fire inside any backward through the wrapped module, which an attack's ``autograd.grad`` is, and it
needs one forward through the wrapper per backward, while a method may read a peer in several views. With
the explicit all_reduce the attacks run on the plain modules and **no collective runs during an attack**;
the cost is that communication does not overlap the backward. Frozen teachers are never synchronised.
``--sync-bn`` (CUDA, NCCL) replaces BatchNorm by SyncBatchNorm in the trainable peers, so train-mode
forwards normalise with the statistics of the whole batch.

**peer-parallel** (``--peer-parallel``): rank ``r`` trains peer ``r mod P`` as replica ``r div P`` (a
peer × replica grid when the world is a multiple of the P trainable peers). The P ranks of one replica see the
same batch (a replica's shard of it); each runs only the attacks on its peer and the views of its peer
(views of frozen models, being deterministic, run on every rank), then all_gathers — within the replica —
the adversarial inputs that another rank's views read (CAT's cross views) and, after its views, the detached
logits of its views. Every rank then evaluates the method's loss on the complete table: the gradient reaching
its peer is the single-process gradient, because every other entry is a constant for that peer. Replicas of
a peer average gradients and BN statistics as in data-parallel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as D
from ..cohort import Cohort
from ..errors import FastcollabError
from ..methods import CLEAN, LogitTable
from .eager import EagerEngine, StepPlan
from .precision import Precision


# ------------------------------------------------------------------------------------ flat collectives
def _float_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for b in model.buffers() if b.is_floating_point()]


@torch.no_grad()
def _weighted_average_(tensors: list[torch.Tensor], weight: float, group) -> None:
    """In place: ``Σ_r w_r·t_r / Σ_r w_r`` over the group, as one all_reduce of one flat buffer."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() * weight for t in tensors]
                     + [torch.tensor([float(weight)], device=tensors[0].device)])
    dist.all_reduce(flat, group=group)
    flat = flat[:-1] / flat[-1]
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))  # copy_ bumps version counters: the fast path's folded twins refresh


@torch.no_grad()
def broadcast_module_(model: nn.Module, src: int, group=None) -> None:
    """Parameters and buffers of ``model`` from global rank ``src`` (one broadcast per dtype)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        dist.broadcast(flat, src=src, group=group)
        for t, part in zip(same, flat.split([t.numel() for t in same])):
            t.copy_(part.view_as(t))


class GradSync:
    """Average the gradients (before the step) and BN statistics (after it) of ``peers`` over ``group``,
    weighted by :attr:`examples`, the number of examples of this rank's current step."""

    def __init__(self, cohort: Cohort, peers: list[str], group=None):
        self.group, self.examples = group, 0
        for name in peers:
            model, opt = cohort.models[name], cohort.optimizers[name]
            opt.register_step_pre_hook(lambda o, args, kwargs, m=model: self._grads(m))
            opt.register_step_post_hook(lambda o, args, kwargs, m=model: self._buffers(m))

    def _grads(self, model: nn.Module) -> None:
        _weighted_average_([p.grad for p in model.parameters() if p.grad is not None], self.examples, self.group)

    def _buffers(self, model: nn.Module) -> None:
        _weighted_average_(_float_buffers(model), self.examples, self.group)


def _check_precision(precision: Precision) -> None:
    if precision.scaler is not None:
        raise FastcollabError("--amp-dtype fp16 is not supported on several processes (each rank's GradScaler "
                              "would skip steps on its own): use --amp-dtype bf16 under torchrun")


def _base_class(name: str, device: torch.device):
    """The single-process engine a distributed step reuses: eager, or the CPU fast path (CUDA graphs do not
    capture collectives here, so on a GPU the distributed step is eager)."""
    if name == "auto":
        name = "fast"
    if name == "eager" or device.type != "cpu":
        return EagerEngine
    if name == "fast":
        from .fast import FastEngine
        return FastEngine
    raise FastcollabError(f"unknown --engine {name!r}: use one of auto, eager, fast")


def apply_sync_bn(cohort: Cohort, device: torch.device) -> None:
    """``--sync-bn``: SyncBatchNorm in the trainable peers (the same parameters, so optimizers still hold them)."""
    if device.type != "cuda":
        raise FastcollabError("--sync-bn needs CUDA GPUs (SyncBatchNorm runs on NCCL); on the CPU drop --sync-bn:"
                              " BatchNorm statistics are then averaged across ranks after every step")
    for name in cohort.trainable:
        cohort.models[name] = nn.SyncBatchNorm.convert_sync_batchnorm(cohort.models[name])


# ------------------------------------------------------------------------------------------ data-parallel
class DataParallelEngine:
    """The whole cohort on every rank, each step on this rank's shard of the batch (see the module doc)."""

    def __init__(self, inner: EagerEngine, group=None):
        self.inner, self.cohort, self.group = inner, inner.cohort, group
        self.name = f"{inner.name}, data-parallel x{dist.get_world_size(group)}"
        for name in self.cohort.trainable:  # identical starting weights whatever each rank's seed did
            broadcast_module_(self.cohort.models[name], src=0, group=group)
        self.sync = GradSync(self.cohort, self.cohort.trainable, group)

    @property
    def plan(self) -> StepPlan:
        return self.inner.plan

    def compute_table(self, x, y) -> LogitTable:
        return self.inner.compute_table(x, y)

    def step(self, x, y, ctx):
        self.sync.examples = len(y)
        return self.inner.step(x, y, ctx)


# ------------------------------------------------------------------------------------------ peer-parallel
@dataclass(frozen=True)
class PeerLayout:
    """Rank ``r`` trains peer ``peers[r % P]`` as replica ``r // P``."""

    peers: tuple[str, ...]
    world: int
    rank: int

    @property
    def replicas(self) -> int:
        return self.world // len(self.peers)

    @property
    def index(self) -> int:
        return self.rank % len(self.peers)

    @property
    def replica(self) -> int:
        return self.rank // len(self.peers)

    @property
    def peer(self) -> str:
        return self.peers[self.index]

    def owner(self, model: str) -> int | None:
        """Index (within a replica) of the rank that computes ``model``'s entries; None: every rank (frozen)."""
        return self.peers.index(model) if model in self.peers else None

    def replica_ranks(self, replica: int) -> list[int]:
        return [replica * len(self.peers) + i for i in range(len(self.peers))]

    def peer_ranks(self, index: int) -> list[int]:
        return [index + r * len(self.peers) for r in range(self.replicas)]


def peer_layout(peers: list[str], world: int, rank: int) -> PeerLayout:
    p = len(peers)
    if p < 2 or world % p:
        raise FastcollabError(
            f"--peer-parallel puts one trainable peer (or a group of replicas of it) on each rank: the cohort "
            f"has {p} trainable peer(s) ({', '.join(peers)}) but {world} processes were launched; launch a "
            f"multiple of {p} (torchrun --nproc-per-node {p}), or drop --peer-parallel for data-parallel")
    return PeerLayout(tuple(peers), world, rank)


def _table_keys(plan: StepPlan) -> list[tuple[str, str]]:
    """Every ``(model, input)`` entry an engine's ``compute_table`` fills for ``plan``, in a fixed order."""
    keys = [(m, CLEAN) for m in plan.clean_refs]
    keys += [(m, k) for m, ks in plan.nograd_batched.items() for k in ks]
    keys += [(v.model, v.input) for v in plan.nograd_single + plan.grad_views]
    return list(dict.fromkeys(keys))


def _own_plan(plan: StepPlan, layout: PeerLayout) -> StepPlan:
    mine = lambda m: layout.owner(m) in (layout.index, None)  # noqa: E731
    return StepPlan(attacks=[a for a in plan.attacks if (layout.owner(a.peer) or 0) == layout.index],
                    clean_refs=[m for m in plan.clean_refs if mine(m)],
                    nograd_batched={m: ks for m, ks in plan.nograd_batched.items() if mine(m)},
                    nograd_single=[v for v in plan.nograd_single if mine(v.model)],
                    grad_views=[v for v in plan.grad_views if mine(v.model)])


class PeerParallelMixin:
    """Turns a single-process engine class into its peer-parallel version (see the module doc)."""

    def setup(self, layout: PeerLayout, group=None, peer_group=None):
        self.layout, self.group = layout, group
        full = self.plan
        self.plan = _own_plan(full, layout)
        p = len(layout.peers)
        attack_owner = {a.key: layout.owner(a.peer) or 0 for a in full.attacks}
        plans = [_own_plan(full, replace(layout, rank=i)) for i in range(p)]
        # inputs that a rank reads but another rank crafts, grouped by the crafting rank
        needed = {k for i, pl in enumerate(plans) for _, k in _table_keys(pl)
                  if k in attack_owner and attack_owner[k] != i}
        self.inputs_by_owner = [[a.key for a in full.attacks if a.key in needed and attack_owner[a.key] == i]
                                for i in range(p)]
        # logits that other ranks need: every trainable model's entries, from the rank that owns the model
        self.logits_by_owner = [[key for key in _table_keys(full) if layout.owner(key[0]) == i] for i in range(p)]
        self.name = f"{self.name}, peer-parallel {p} peers x {layout.replicas} replica(s)"
        for name in self.cohort.trainable:  # identical starting weights on every rank
            broadcast_module_(self.cohort.models[name], src=0)
        self.sync = GradSync(self.cohort, [layout.peer], peer_group) if layout.replicas > 1 else None

    def _exchange(self, local: dict, keys_by_owner: list[list], like: torch.Tensor) -> dict:
        """all_gather within the replica: rank i sends its tensors of ``keys_by_owner[i]`` (each shaped like
        ``like``), every rank receives all of them, detached."""
        count = max(len(ks) for ks in keys_by_owner)
        if count == 0:
            return {}
        mine = keys_by_owner[self.layout.index]
        send = torch.zeros((count, *like.shape), dtype=like.dtype, device=like.device)
        for j, k in enumerate(mine):
            send[j] = local[k].detach()
        parts = [torch.empty_like(send) for _ in keys_by_owner]
        dist.all_gather(parts, send, group=self.group)
        return {k: parts[i][j] for i, ks in enumerate(keys_by_owner) for j, k in enumerate(ks)}

    def _attacks(self, x, y, clean):
        own = super()._attacks(x, y, clean)
        return {**self._exchange(own, self.inputs_by_owner, x), **own}

    def compute_table(self, x, y) -> LogitTable:
        local = super().compute_table(x, y)
        like = local[next(iter(local.keys()))]
        received = self._exchange({k: local[k] for k in local.keys()}, self.logits_by_owner, like)
        return LogitTable({**received, **{k: local[k] for k in local.keys()}})

    def step(self, x, y, ctx):
        if self.sync is not None:
            self.sync.examples = len(y)
        return super().step(x, y, ctx)

    def gather_cohort(self) -> None:
        """Every peer's weights and optimizer state on every rank (before evaluation and checkpoints)."""
        for i, name in enumerate(self.layout.peers):
            broadcast_module_(self.cohort.models[name], src=i)
            opt = self.cohort.optimizers[name]
            state = [opt.state_dict()]
            dist.broadcast_object_list(state, src=i)
            if i != self.layout.index:
                opt.load_state_dict(state[0])


def _groups(layout: PeerLayout):
    """This rank's replica group (the P ranks that share a batch) and peer group (the replicas of its peer);
    every rank creates every group, in the same order, as torch.distributed requires."""
    if layout.replicas == 1:
        return None, None
    mine_r = mine_p = None
    for r in range(layout.replicas):
        g = dist.new_group(layout.replica_ranks(r))
        mine_r = g if r == layout.replica else mine_r
    for i in range(len(layout.peers)):
        g = dist.new_group(layout.peer_ranks(i))
        mine_p = g if i == layout.index else mine_p
    return mine_r, mine_p


# ------------------------------------------------------------------------------------------ entry point
def make_distributed_engine(name: str, cohort: Cohort, precision: Precision, view_bn: str = "eval", *,
                            peer_parallel: bool = False, sync_bn: bool = False):
    """The engine of a run: data-parallel or peer-parallel when a process group of 2+ ranks is up, else the
    single-process engine ``name``. Returns ``(engine, (shard index, shard count))``: the loader's shard of
    each batch."""
    if not D.is_distributed():
        from . import make_engine
        return make_engine(name, cohort, precision, view_bn), (0, 1)
    _check_precision(precision)
    if sync_bn:
        apply_sync_bn(cohort, precision.device)
    base = _base_class(name, precision.device)
    world, rank = dist.get_world_size(), dist.get_rank()
    if not peer_parallel:
        return DataParallelEngine(base(cohort, precision, view_bn)), (rank, world)
    layout = peer_layout(cohort.trainable, world, rank)
    group, peer_group = _groups(layout)
    cls = type(f"PeerParallel{base.__name__}", (PeerParallelMixin, base), {})
    engine = cls(cohort, precision, view_bn)
    engine.setup(layout, group, peer_group)
    return engine, (layout.replica, layout.replicas)


def gather_cohort(engine) -> None:
    """Before an evaluation or a checkpoint: every peer's current weights on every rank (peer-parallel)."""
    if isinstance(engine, PeerParallelMixin):
        engine.gather_cohort()
