"""The CUDA-graphed engine: the eager engine's whole cohort step, captured once and replayed.

After ``warmup_steps`` warm-up steps, one step is captured into a ``torch.cuda.CUDAGraph``: every peer's attack
loop (the attacks of different peers on their own streams, forked from and joined back to the capturing stream
with stream waits), the views, the method's loss, the backward and every optimizer step. Every later step
copies the batch into static input buffers and replays the graph: one launch for the whole step, no host
round trip.

Warm-up steps are real training steps that run exactly the code the capture records, **on the same streams**
(the engine's capture stream and its per-peer attack streams): cuDNN picks its algorithms, the caching
allocator and cuBLAS workspaces are set up per stream, the optimizers' momentum buffers are created, and every
stream has been used before a capture sees it. A batch shape not seen before gets one such warm-up step
before it is captured. Every step returns a *detached* ``LossResult``, so the caller's reference to the
previous step's result never keeps an autograd graph alive into a capture.

What makes a step capturable:
- the batch lives in static buffers (``x`` stays NCHW so random starts draw the same numbers as eager);
- the learning rate lives in a device tensor per parameter group, refreshed from the group's float (which
  ``Cohort.set_epoch_time`` writes) before each replay, and the SGD update is :func:`sgd_step` here, whose
  ``torch._foreach`` ops read it (``torch.optim.SGD`` would read a tensor lr with ``.item()``, a host sync);
  weight decay, momentum, dampening and Nesterov are baked in, so they are part of the graph's key: changing
  one re-captures;
- random starts use torch's Philox CUDA generator, which is capture-safe (each replay reads the generator's
  seed and offset, so ``torch.manual_seed`` governs replays as it governs eager steps);
- bf16 autocast (when asked, ``--amp``) with its weight-cast cache off inside the graph; no GradScaler;
- models in channels_last; ``cudnn.benchmark`` on while the engine warms up and captures (restored after:
  no global side effect).
The graph's key: the host-side inputs of the loss (``StepContext``: the epoch), the batch shapes and dtypes,
the optimizers' baked-in hyper-parameters and the addresses of parameters and momentum buffers (replaced by
``load_state_dict`` on ``--resume``). A new key is captured anew.

Where capture is impossible the engine says why (``fallback_reason``: the whole chained error of a failed
capture, root cause first) in the console, in :meth:`stats` (run config / metrics / benchmark JSON), and runs
eager steps: fp16 with a GradScaler (its inf check skips steps on the host), optimizers other than SGD, a
capture that failed twice. A first failed capture (a transient: first use of a shape or a stream) is followed
by an eager warm-up step and one retry.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch

from ..cohort import Cohort
from ..methods import LossResult, StepContext
from .eager import EagerEngine
from .precision import AMP_DTYPES, Precision

log = logging.getLogger("fastcollab")


def error_chain(e: BaseException) -> str:
    """The whole chain of a failure, root cause first: ``capture_end``'s generic error is raised while
    handling the real one (``__context__``), which must not be lost. Messages are kept whole."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(f"{type(e).__name__}: {e}".strip())
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    chain.reverse()
    return chain[0] + "".join(f" | then, while handling it: {c}" for c in chain[1:])


class CapturePolicy:
    """What the next step does: ``warmup`` (an eager step on the capture streams), ``capture``, ``replay`` or
    ``eager`` (fallen back for good). Host-side bookkeeping only, so it is unit-tested without a GPU.

    - the first ``warmup_steps`` steps, and the first step of every batch shape not seen before, warm up;
    - a key different from the captured graph's is captured;
    - a failed capture is retried once, after a warm-up step; a second consecutive failure falls back."""

    def __init__(self, warmup_steps: int, retries: int = 1):
        self.warmup_steps, self.retries = max(1, int(warmup_steps)), int(retries)
        self.steps = 0
        self.warm_shapes: set = set()
        self.key = None
        self.failures = 0
        self.fallback_reason: str | None = None
        self.errors: list[str] = []

    def next_action(self, key, shape) -> str:
        if self.fallback_reason is not None:
            return "eager"
        if self.steps < self.warmup_steps or shape not in self.warm_shapes:
            return "warmup"
        return "replay" if key == self.key else "capture"

    def warmed(self, shape) -> None:
        self.steps += 1
        self.warm_shapes.add(shape)

    def captured(self, key) -> None:
        self.key, self.failures = key, 0

    def replayed(self) -> None:
        self.steps += 1

    def failed(self, reason: str, shape) -> bool:
        """Record a failed capture; True when this one makes the fallback permanent."""
        self.key = None
        self.failures += 1
        self.errors.append(reason)
        if self.failures > self.retries:
            self.fallback_reason = f"capture failed {self.failures} times; last: {reason}"
            return True
        self.warm_shapes.discard(shape)          # the retry comes after one more warm-up step
        return False


@torch.no_grad()
def sgd_step(optimizers: dict, lrs: dict) -> None:
    """``torch.optim.SGD.step`` (weight decay, momentum, dampening, Nesterov) with the lr read from a tensor
    per parameter group (``lrs[name][i]``): no host sync, capturable. A missing momentum buffer is created as
    SGD's first step does (``buf = g``); captures only happen once every buffer exists."""
    for name, opt in optimizers.items():
        for group, lr in zip(opt.param_groups, lrs[name]):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["momentum"] != 0:
                state = [opt.state[p] for p in params]
                old = [i for i, s in enumerate(state) if "momentum_buffer" in s]
                if old:
                    bufs = [state[i]["momentum_buffer"] for i in old]
                    torch._foreach_mul_(bufs, group["momentum"])
                    torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1 - group["dampening"])
                for i, s in enumerate(state):
                    if "momentum_buffer" not in s:
                        s["momentum_buffer"] = grads[i].detach().clone()
                bufs = [s["momentum_buffer"] for s in state]
                grads = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
            torch._foreach_sub_(params, torch._foreach_mul(grads, lr))


def sgd_hyper_key(optimizers: dict) -> tuple:
    """The SGD hyper-parameters a captured step bakes in (a change re-captures)."""
    return tuple((n, i, g["weight_decay"], g["momentum"], g["dampening"], g["nesterov"])
                 for n, opt in optimizers.items() for i, g in enumerate(opt.param_groups))


@contextlib.contextmanager
def cudnn_benchmark():
    """``cudnn.benchmark`` on inside the block, the caller's setting back after."""
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = prev


def detached(r: LossResult, stream=None) -> LossResult:
    """A copy of ``r`` with no autograd graph (and, for a graph's output buffers, no aliasing)."""
    def own(v):
        if not torch.is_tensor(v):
            return v
        v = v.detach().clone()
        if stream is not None and v.is_cuda:
            v.record_stream(stream)
        return v
    return LossResult(own(r.total), {k: own(v) for k, v in r.terms.items()}, {k: own(v) for k, v in r.correct.items()})


class _GraphPrecision(Precision):
    """The run's precision with autocast's weight-cast cache off (cached casts must not outlive a capture)."""

    def __init__(self, base: Precision):
        super().__init__(base.device, base.amp, base.amp_dtype)
        self.scaler = base.scaler

    @property
    def autocast(self):
        if not self.amp:
            return super().autocast
        return functools.partial(torch.autocast, device_type=self.device.type, dtype=AMP_DTYPES[self.amp_dtype],
                                 cache_enabled=False)


class GraphedEngine(EagerEngine):
    name = "fast"

    def __init__(self, cohort: Cohort, precision: Precision, view_bn: str = "eval", *, warmup_steps: int = 3,
                 streams: bool = True, channels_last: bool = True):
        super().__init__(cohort, _GraphPrecision(precision), view_bn)
        self.policy = CapturePolicy(warmup_steps)
        self.replays = self.captures = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._out = self._static = None
        self._fork = False
        why = self._why_not()
        if why is not None:
            self._fall_back(why)
            return
        if channels_last:
            for m in cohort.models.values():
                m.to(memory_format=torch.channels_last)       # in place: same Parameter objects
        dev = precision.device
        self._capture_stream = torch.cuda.Stream(device=dev)
        # one stream per attacked peer (attacks on one peer stay in order on its stream)
        peers = list(dict.fromkeys(a.peer for a in self.plan.attacks))
        self._stream_of = {p: torch.cuda.Stream(device=dev) for p in peers} if streams and len(peers) > 1 else {}
        self._lr = {n: [torch.tensor(float(g["lr"]), device=dev, dtype=torch.float32) for g in opt.param_groups]
                    for n, opt in cohort.optimizers.items()}
        self._pool = torch.cuda.graph_pool_handle()

    # ----------------------------------------------------------------------------------- capturability
    @property
    def fallback_reason(self) -> str | None:
        return self.policy.fallback_reason

    def _why_not(self) -> str | None:
        p = self.precision
        if p.device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if p.scaler is not None:
            return "fp16 autocast uses a GradScaler, whose inf check skips steps on the host: use --amp-dtype bf16"
        for name, opt in self.cohort.optimizers.items():
            if type(opt) is not torch.optim.SGD:
                return f"peer {name}'s optimizer {type(opt).__name__} has no graph-safe step here (SGD only)"
            for g in opt.param_groups:
                if g.get("maximize") or g.get("differentiable"):
                    return f"peer {name}'s SGD uses maximize/differentiable, which the captured step does not do"
        if getattr(self.cohort.method, "host_decisions", False):
            return f"method {self.cohort.method.name} takes a host-side decision inside its step"
        return None

    def _fall_back(self, reason: str) -> None:
        """Eager from now on, saying why in the console (log + warning) and in stats()."""
        self.policy.fallback_reason = reason
        self.name = "eager (graphed engine fell back)"
        msg = f"fastcollab: graphed engine falls back to eager: {reason}"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def describe(self) -> str:
        if self.fallback_reason:
            return f"eager (graphed engine fell back: {self.fallback_reason})"
        return (f"graphed (CUDA graph, {len(self._stream_of)} attack streams, {self.precision.describe()}, "
                f"{self.captures} captures, {self.replays} replays)")

    def stats(self) -> dict:
        """What the run's config / metrics and the benchmark JSON record about this engine."""
        return {"engine": self.name, "graphed": self.fallback_reason is None and self.replays > 0,
                "fallback_reason": self.fallback_reason, "captures": self.captures, "replays": self.replays,
                "warmup_steps": self.policy.steps - self.replays, "capture_errors": list(self.policy.errors)}

    # ------------------------------------------------------------------------------------------- hooks
    def _attacks(self, x, y, clean):
        if not self._fork or len(self._stream_of) < 2:
            return super()._attacks(x, y, clean)
        main = torch.cuda.current_stream()
        out = {}
        for s in self._stream_of.values():
            s.wait_stream(main)                                   # fork
        for a in self.plan.attacks:
            with torch.cuda.stream(self._stream_of[a.peer]):
                out[a.key] = self._attack(a, x, y, clean)
        for s in self._stream_of.values():
            main.wait_stream(s)                                   # join
        return out

    # ----------------------------------------------------------------------------------------- the step
    def _body(self, x, y, ctx) -> LossResult:
        """One step as the graph records it (warm-up steps run this same code on the same streams)."""
        cohort = self.cohort
        cohort.train_mode()
        result = cohort.method.loss(self.compute_table(x, y), y, ctx)
        for opt in cohort.optimizers.values():
            opt.zero_grad(set_to_none=True)   # under capture: gradients are allocated in the graph's pool
        result.total.backward()
        sgd_step(cohort.optimizers, self._lr)
        return result

    def _key(self, x, y, ctx) -> tuple:
        ids = tuple((p.data_ptr(), None if (b := opt.state.get(p, {}).get("momentum_buffer")) is None
                     else b.data_ptr())
                    for opt in self.cohort.optimizers.values() for g in opt.param_groups for p in g["params"])
        return (ctx.epoch, ctx.epochs, self._shape(x, y), sgd_hyper_key(self.cohort.optimizers), ids)

    @staticmethod
    def _shape(x, y) -> tuple:
        return (tuple(x.shape), tuple(y.shape), x.dtype, y.dtype)

    def _refresh_lr(self) -> None:
        for name, opt in self.cohort.optimizers.items():
            for group, lr in zip(opt.param_groups, self._lr[name]):
                lr.fill_(float(group["lr"]))

    def _warmup_step(self, x, y, ctx) -> LossResult:
        """A real eager step on the capture stream with the attack streams forked, as the capture will run."""
        main, side = torch.cuda.current_stream(), self._capture_stream
        self._refresh_lr()
        side.wait_stream(main)
        self._fork = True
        try:
            with torch.cuda.stream(side), cudnn_benchmark():
                result = detached(self._body(x, y, ctx), stream=main)
        finally:
            self._fork = False
        main.wait_stream(side)
        return result

    def _capture(self, x, y, ctx) -> None:
        for name, opt in self.cohort.optimizers.items():
            for g in opt.param_groups:
                if g["momentum"] != 0 and any(p.requires_grad and "momentum_buffer" not in opt.state.get(p, {})
                                              for p in g["params"]):
                    raise RuntimeError(f"peer {name}: a parameter has no momentum buffer after the warm-up steps")
        self.graph = self._out = None            # the previous graph and its output buffers go first
        self._static = (x.clone(), y.clone())
        for opt in self.cohort.optimizers.values():
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        self._fork = True
        try:
            with cudnn_benchmark(), torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream):
                self._out = self._body(*self._static, ctx)
        finally:
            self._fork = False
        self.graph = graph
        self.captures += 1

    def step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossResult:
        policy = self.policy
        if policy.fallback_reason is not None:
            return super().step(x, y, ctx)
        shape, key = self._shape(x, y), self._key(x, y, ctx)
        action = policy.next_action(key, shape)
        if action == "warmup":
            result = self._warmup_step(x, y, ctx)
            policy.warmed(shape)
            return result
        if action == "capture":
            try:
                self._capture(x, y, ctx)
            except Exception as e:  # noqa: BLE001 - whatever breaks capture, eager still computes the step
                self.graph = self._out = None
                for opt in self.cohort.optimizers.values():
                    opt.zero_grad(set_to_none=True)
                reason = error_chain(e)
                if policy.failed(reason, shape):
                    self._fall_back(policy.fallback_reason)
                    return super().step(x, y, ctx)
                log.warning("fastcollab: CUDA graph capture failed, retrying once after a warm-up step: %s", reason)
                result = self._warmup_step(x, y, ctx)
                policy.warmed(shape)
                return result
            policy.captured(self._key(x, y, ctx))   # capture allocated the gradients: same addresses from now on
        sx, sy = self._static
        sx.copy_(x)
        sy.copy_(y)
        self._refresh_lr()
        self.graph.replay()
        self.replays += 1
        policy.replayed()
        return detached(self._out)   # the graph's output buffers: copied, the next replay overwrites them
