"""A batch with NaN or inf is never trained on: inserting one into the data changes nothing but the count.

Each test trains twice on the same batches, once with rejected batches inserted, and requires the two runs
to end bit for bit alike: weights and buffers, the optimiser's tensors and step counters, the firing
tracker, the random state, the step count and the learning rate of every step (all in the final
checkpoint and the per-step history). Only the rejection count and the number of batches consumed differ.
"""
import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from sae_core.config import TrainConfig
from sae_core.distributed import init_from_env
from sae_core.synthetic import superposition_data
from sae_core.train import CHECKPOINT_NAME, train_dictionary

D, ROWS, N_BATCHES = 16, 64, 10


def _nan_batch(batch):
    return torch.full_like(batch, float("nan"))


def _one_nan_row(batch):  # its finite rows must not reach training, nor the initial statistics
    bad = batch.clone()
    bad[5] = float("nan")
    return bad


def _one_inf(batch):
    bad = batch.clone()
    bad[0, 3] = float("inf")
    return bad


POISONS = {"nan_batch": _nan_batch, "one_nan_row": _one_nan_row, "one_inf": _one_inf}


def _batches(seed=0):
    x = superposition_data(n_samples=ROWS * N_BATCHES, d=D, n_features=48, mean_l0=3, seed=seed).x
    return list(x.split(ROWS))


def _config(kind, **overrides):
    base = dict(kind=kind, k=4, n_latents=32, total_steps=24, batch_size=ROWS, warmup_steps=3, lr=3e-3,
                dead_tokens=300, log_every=1, checkpoint_every=8, init_tokens=2 * ROWS, loss_threshold=0.2,
                max_atoms=400)
    base.update(overrides)
    return TrainConfig.from_dict(base)


def _with_rejects(batches, inserts):
    """``batches`` with the poisoned copy of ``batches[i]`` inserted before position ``at``, for each
    ``(at, i, poison)``; ``at`` counts positions in the original list."""
    out = list(batches)
    for at, i, poison in sorted(inserts, key=lambda item: item[0], reverse=True):
        out.insert(at, POISONS[poison](batches[i]))
    return out


class _Counting:
    """A re-iterable over ``batches`` that counts the non-finite batches it hands out."""

    def __init__(self, batches):
        self.batches, self.bad = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.bad += int(not torch.isfinite(batch).all())
            yield batch


def _checkpoint(directory):
    with safe_open(str(Path(directory) / CHECKPOINT_NAME), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _run(batches, config, directory):
    """Train on ``batches`` and return what must not depend on rejected batches, and the rejection counts."""
    data = _Counting(batches)
    result = train_dictionary(data, config, checkpoint_dir=directory)
    history = [{k: v for k, v in m.items() if k not in ("rejected_batches", "seconds")} for m in result.history]
    return {
        "state": {k: v.clone() for k, v in result.dictionary.state_dict().items()},
        "checkpoint": _checkpoint(directory),
        "history": history,
        "steps": result.dictionary.metadata["training"]["steps"],
        "rejected": result.rejected_batches,
        "bad_drawn": data.bad,
    }


def _assert_same_tensors(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def _assert_trained_alike(got, want):
    _assert_same_tensors(got["state"], want["state"])
    _assert_same_tensors(got["checkpoint"], want["checkpoint"])  # model, optimiser (with steps), tracker, rng
    assert got["steps"] == want["steps"]
    assert [m["lr"] for m in got["history"] if "lr" in m] == [m["lr"] for m in want["history"] if "lr" in m]
    assert got["history"] == want["history"]


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("kind", ["topk", "itda"])
@pytest.mark.parametrize("poison", sorted(POISONS))
def test_inserted_rejected_batches_leave_the_result_bit_for_bit_unchanged(tmp_path, kind, poison):
    batches = _batches()
    config = _config(kind)
    clean = _run(batches, config, tmp_path / "clean")
    # one inside the first batches (those that also set the normalisation and b_dec), one mid-pass
    poisoned = _run(_with_rejects(batches, [(1, 0, poison), (6, 5, poison)]), config, tmp_path / "poisoned")
    _assert_trained_alike(poisoned, clean)
    assert poisoned["steps"] == config.total_steps
    assert clean["rejected"] == 0
    assert poisoned["rejected"] == poisoned["bad_drawn"] >= 4  # every pass (24 steps > 2 passes) rejects both again


def test_a_run_of_rejected_batches_at_the_start_does_not_consume_steps(tmp_path):
    batches = _batches()
    config = _config("batchtopk", total_steps=12)
    clean = _run(batches, config, tmp_path / "clean")
    poisoned = _run(_with_rejects(batches, [(0, i, "nan_batch") for i in range(5)]), config, tmp_path / "poisoned")
    _assert_trained_alike(poisoned, clean)
    assert poisoned["rejected"] == poisoned["bad_drawn"] == 10  # 5 per pass, 2 passes begun


# ----------------------------------------------------------------------------- two processes

DDP_CONFIG = dict(total_steps=16, checkpoint_every=4)
DDP_INSERTS = [(1, 0, "one_nan_row"), (4, 3, "nan_batch")]  # rank 1 only; rank 0's data is clean


def _worker(rank, tmp, port):
    """Rank ``rank`` of two: a clean run and one where only rank 1's data holds rejected batches."""
    tmp = Path(tmp)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_from_env("cpu", timeout=datetime.timedelta(seconds=60))
    config = _config("batchtopk", **DDP_CONFIG)
    batches = _batches(seed=rank)
    clean = train_dictionary(batches, config, checkpoint_dir=tmp / "clean")
    data = _Counting(_with_rejects(batches, DDP_INSERTS) if rank == 1 else batches)
    poisoned = train_dictionary(data, config, checkpoint_dir=tmp / "poisoned")
    report = {
        name: {"state": {k: v.clone() for k, v in r.dictionary.state_dict().items()}, "history": r.history,
               "rejected": r.rejected_batches, "steps": r.dictionary.metadata["training"]["steps"]}
        for name, r in (("clean", clean), ("poisoned", poisoned))
    }
    report["bad_drawn"] = data.bad
    torch.save(report, tmp / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # gloo's threads may abort the interpreter's teardown (see tests/test_distributed.py)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_batch_rejected_on_one_rank_changes_no_rank_and_loses_no_good_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    drop = lambda h: [{k: v for k, v in m.items() if k not in ("rejected_batches", "seconds")} for m in h]  # noqa: E731
    _assert_same_tensors(_checkpoint(tmp_path / "poisoned"), _checkpoint(tmp_path / "clean"))
    for report in (r0, r1):
        _assert_same_tensors(report["poisoned"]["state"], report["clean"]["state"])
        assert drop(report["poisoned"]["history"]) == drop(report["clean"]["history"])
        assert report["poisoned"]["steps"] == report["clean"]["steps"] == DDP_CONFIG["total_steps"]
    _assert_same_tensors(r0["poisoned"]["state"], r1["poisoned"]["state"])
    assert r0["bad_drawn"] == 0 and r1["bad_drawn"] >= 2
    for report in (r0, r1):
        assert report["clean"]["rejected"] == 0
        assert report["poisoned"]["rejected"] == r1["bad_drawn"]  # counted once, over all ranks, on every rank
