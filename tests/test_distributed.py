"""Scale out (DESIGN §8) on the CPU: 2 processes, gloo, a ``file://`` rendezvous, one thread each.

One spawn runs every distributed scenario (process start-up dominates the cost); each test asserts on what
the ranks recorded. References are single-process steps computed in the same worker, without collectives.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastcollab import distributed as D
from fastcollab.cohort import Cohort, sgd_for
from fastcollab.config import resolve_config
from fastcollab.engine import EagerEngine, Precision, make_distributed_engine
from fastcollab.engine.distributed import apply_sync_bn, peer_layout
from fastcollab.engine.fast import FastEngine
from fastcollab.errors import FastcollabError
from fastcollab.methods import StepContext, get_method
from fastcollab.models import create_model
from fastcollab.schedule import LRSchedule

WORLD = 2
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor")


def tiny_nobn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, 10))


def build_cohort(method_name: str, make_model, **given) -> Cohort:
    config = resolve_config({"method": method_name, "model": "smallcnn", "attack_steps": 2, "lr": 0.05,
                             "epochs": 1, "attack_init": "zero", **given})
    method = get_method(method_name)(config)
    torch.manual_seed(0)
    models = {p: make_model() for p in method.trainable_peers()}
    opts = {p: sgd_for(m, config["lr"], 0.9, config["weight_decay"]) for p, m in models.items()}
    return Cohort(method, models, opts, {p: LRSchedule("piecewise", config["lr"], 1) for p in models})


def batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def state(cohort: Cohort) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n in cohort.trainable
            for k, v in cohort.models[n].state_dict().items() if v.is_floating_point()}


class Counter:
    """Wraps torch.distributed's collectives: how many ran, and how many bytes they carried."""

    def __init__(self):
        self.calls, self.bytes = 0, 0
        for name in COLLECTIVES:
            fn = getattr(dist, name)

            def wrapped(*args, _fn=fn, **kwargs):
                self.calls += 1
                self.bytes += sum(t.numel() * t.element_size() for t in args if torch.is_tensor(t))
                return _fn(*args, **kwargs)
            setattr(dist, name, wrapped)


def reference_steps(cohort: Cohort, engine_cls, x, y, steps: int) -> dict:
    engine = engine_cls(cohort, Precision(torch.device("cpu")))
    losses = [float(engine.step(x, y, StepContext()).total.detach()) for _ in range(steps)]
    return {"state": state(cohort), "losses": losses}


def data_parallel(record: dict, key: str, make_model, engine_name: str, n: int, steps: int = 3) -> None:
    """A data-parallel run on this rank's shard, and (same worker, no collectives) the full-batch reference."""
    x, y = batch(n)
    ref = reference_steps(build_cohort("mat", make_model), EagerEngine if engine_name == "eager" else FastEngine,
                          x, y, steps)
    cohort = build_cohort("mat", make_model)
    engine, (index, count) = make_distributed_engine(engine_name, cohort, Precision(torch.device("cpu")))
    lo, hi = D.shard_bounds(n, index, count)
    counter, during_attacks = record["counter"], []
    attacks = engine.inner._attacks

    def counted_attacks(*args):
        before = counter.calls
        out = attacks(*args)
        during_attacks.append(counter.calls - before)
        return out
    engine.inner._attacks = counted_attacks
    calls0, bytes0 = counter.calls, counter.bytes
    for _ in range(steps):
        engine.step(x[lo:hi], y[lo:hi], StepContext())
    record[key] = {"state": state(cohort), "ref": ref["state"], "during_attacks": during_attacks,
                   "calls_per_step": (counter.calls - calls0) / steps,
                   "bytes_per_step": (counter.bytes - bytes0) / steps}


def peer_parallel(record: dict, key: str, method: str, engine_name: str, steps: int = 2, **given) -> None:
    x, y = batch(16, seed=2)
    cls = EagerEngine if engine_name == "eager" else FastEngine
    ref = reference_steps(build_cohort(method, lambda: create_model("smallcnn"), **given), cls, x, y, steps)
    cohort = build_cohort(method, lambda: create_model("smallcnn"), **given)
    engine, shard = make_distributed_engine(engine_name, cohort, Precision(torch.device("cpu")), peer_parallel=True)
    counter = record["counter"]
    calls0, bytes0 = counter.calls, counter.bytes
    losses = [float(engine.step(x, y, StepContext()).total.detach()) for _ in range(steps)]
    per_step = ((counter.calls - calls0) / steps, (counter.bytes - bytes0) / steps)
    engine.gather_cohort()
    record[key] = {"state": state(cohort), "ref": ref["state"], "losses": losses, "ref_losses": ref["losses"],
                   "shard": shard, "calls_per_step": per_step[0], "bytes_per_step": per_step[1]}


class Killed(Exception):
    pass


def train_then_kill(out: str, data: str) -> None:
    """``python -m fastcollab.train`` on 2 ranks, killed (on every rank) right after epoch 1 is saved."""
    from fastcollab import train

    save = train.Trainer.save

    def save_then_kill(self, epoch):
        save(self, epoch)
        if epoch == 1:
            raise Killed
    train.Trainer.save = save_then_kill
    try:
        train.main(train_args(out, data, epochs=2))
    except Killed:
        pass
    finally:
        train.Trainer.save = save


def train_args(out: str, data: str, epochs: int = 1, *extra) -> list[str]:
    return ["--method", "mat", "--model", "smallcnn", "--dataset", data, "--epochs", str(epochs),
            "--batch-size", "16", "--attack-steps", "1", "--eval-subset", "8", "--final-eval-size", "8",
            "--final-attacks", "clean", "--out", out, "--no-progress", *extra]


def worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    record = {"counter": Counter()}
    try:
        t = torch.arange(D.shard_bounds(7, rank, WORLD)[0], D.shard_bounds(7, rank, WORLD)[1])
        record["gathered"] = D.gather_rows(t)
        record["mean"] = D.weighted_mean({"v": float(rank + 1)}, weight=1 + 2 * rank)["v"]
        data_parallel(record, "dp_nobn", tiny_nobn, "eager", n=11)
        data_parallel(record, "dp_bn", lambda: create_model("smallcnn"), "fast", n=32, steps=2)
        peer_parallel(record, "pp_mat", "mat", "fast")
        peer_parallel(record, "pp_cat", "cat", "eager", peer_methods=["trades", "alp"])
        data = "synthetic:48"
        train_then_kill(f"{tmp}/dp_run", data)
        from fastcollab import train
        record["pp_exit"] = train.main(train_args(f"{tmp}/pp_run", data, 1, "--peer-parallel"))
    finally:
        record.pop("counter")
        torch.save(record, f"{tmp}/rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


def test_gather_rows_and_weighted_mean_uneven_shards(ranks):
    _, rec = ranks
    for r in rec:
        assert torch.equal(r["gathered"], torch.arange(7))  # 3 + 4 rows, none padded or repeated
        assert r["mean"] == pytest.approx((1 * 1 + 2 * 3) / 4)


def test_data_parallel_equals_full_batch_step_without_bn(ranks):
    _, rec = ranks
    close(rec[0]["dp_nobn"]["state"], rec[1]["dp_nobn"]["state"], rtol=0, atol=0)  # the same on both ranks
    # shards of 5 and 6 images: the weighted gradient average is the 11-image gradient (float rounding only)
    close(rec[0]["dp_nobn"]["state"], rec[0]["dp_nobn"]["ref"], rtol=1e-5, atol=1e-6)


def test_data_parallel_with_bn_within_tolerance_buffers_included(ranks):
    _, rec = ranks
    dp = rec[0]["dp_bn"]
    close(dp["state"], rec[1]["dp_bn"]["state"], rtol=0, atol=0)  # weights and BN buffers equal across ranks
    # per-shard batch statistics change the step a little, not its direction; buffers stay close too
    close(dp["state"], dp["ref"], rtol=0, atol=2e-2)
    # the first BN's running mean: averaging the shards' is exact for step 1; step 2 sees slightly other weights
    bn0 = "p0.features.0.1.running_mean"
    torch.testing.assert_close(dp["state"][bn0], dp["ref"][bn0], rtol=0, atol=1e-3)


def test_no_collective_runs_during_an_attack(ranks):
    _, rec = ranks
    # per trainable peer and step: one all_reduce of its gradients, one of its BN buffers (if it has BN)
    for key, calls in (("dp_nobn", 2), ("dp_bn", 4)):
        r = rec[0][key]
        assert r["during_attacks"] and all(c == 0 for c in r["during_attacks"]), r["during_attacks"]
        assert r["calls_per_step"] == calls


@pytest.mark.parametrize("key", ["pp_mat", "pp_cat"])
def test_peer_parallel_equals_single_process_cohort(ranks, key):
    _, rec = ranks
    for r in rec:
        pp = r[key]
        assert pp["shard"] == (0, 1)  # every rank sees the whole batch
        assert pp["losses"] == pytest.approx(pp["ref_losses"], rel=1e-5)
        close(pp["state"], pp["ref"], rtol=1e-5, atol=1e-6)


def test_peer_parallel_exchanges_inputs_only_for_cross_views(ranks):
    _, rec = ranks
    # MAT reads other peers only on clean images: one all_gather of logits; CAT's cross views add the inputs
    assert rec[0]["pp_mat"]["calls_per_step"] == 1
    assert rec[0]["pp_cat"]["calls_per_step"] == 2


def test_torchrun_runs_write_one_folder_and_resume_in_one_process(ranks):
    from fastcollab import load_cohort, train
    from fastcollab.checkpoint import load_checkpoint

    tmp, rec = ranks
    assert rec[0]["pp_exit"] == 0 and rec[1]["pp_exit"] == 0
    assert len(load_cohort(tmp / "pp_run")) == 2
    assert json.loads((tmp / "pp_run" / "final.json").read_text())["status"] == "ok"
    first = load_checkpoint(tmp / "dp_run" / "checkpoint.pt")
    assert first["epoch"] == 1
    # the rank-0 checkpoint of the 2-rank run continues in a single process (another world size)
    assert train.main(train_args(str(tmp / "dp_run"), "synthetic:48", 2, "--resume")) == 0
    done = load_checkpoint(tmp / "dp_run" / "checkpoint.pt")
    assert done["epoch"] == 2 and done["metrics"][0] == first["metrics"][0]
    assert len(load_cohort(tmp / "dp_run")) == 2


def test_bad_world_size_for_peer_parallel_is_one_clear_error():
    with pytest.raises(FastcollabError, match="2 trainable peer.*3 processes were launched"):
        peer_layout(["p0", "p1"], world=3, rank=0)
    grid = peer_layout(["p0", "p1"], world=4, rank=3)
    assert (grid.peer, grid.replica, grid.replicas) == ("p1", 1, 2)


def test_sync_bn_on_cpu_is_one_clear_error():
    cohort = build_cohort("mat", lambda: create_model("smallcnn"))
    with pytest.raises(FastcollabError, match="--sync-bn needs CUDA"):
        apply_sync_bn(cohort, torch.device("cpu"))


def test_one_process_gets_the_plain_engine_and_the_whole_batch():
    cohort = build_cohort("mat", tiny_nobn)
    engine, shard = make_distributed_engine("eager", cohort, Precision(torch.device("cpu")), peer_parallel=True)
    assert isinstance(engine, EagerEngine) and shard == (0, 1)
    assert D.world_size() == 1 and D.is_main()


def test_loader_shards_are_exact_slices_of_the_single_process_batches():
    from fastcollab.data import DeviceLoader

    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(50)
    full = list(DeviceLoader(x, y, 16, seed=3))
    shards = []
    for r in range(3):
        loader = DeviceLoader(x, y, 16, seed=3)
        loader.set_shard(r, 3)
        shards.append(list(loader))
    assert [len(s[0][1]) for s in shards] == [5, 5, 6]
    for b, (xb, yb) in enumerate(full):  # same crops, flips and order: nothing padded, dropped or repeated
        assert torch.equal(torch.cat([s[b][0] for s in shards]), xb)
        assert torch.equal(torch.cat([s[b][1] for s in shards]), yb)
    with pytest.raises(FastcollabError, match="launch at most --batch-size processes"):
        DeviceLoader(x, y, 16).set_shard(0, 17)
