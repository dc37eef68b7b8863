"""Training a dictionary from any stream of activation batches.

One loop for every kind: TopK and BatchTopK SAEs learn by Adam on the FVU
loss (+ AuxK on dead latents), Matryoshka BatchTopK SAEs on the mean FVU of
their nested prefixes (see :func:`prefix_fvus`); ITDA grows its dictionary
from the inputs it reconstructs badly. Both share what a long job needs:

* data: a tensor ``(N, d)`` (shuffled per epoch with the seed), a callable
  returning a fresh iterable, or a re-iterable (list, shard reader); batches
  are tensors ``(..., d)`` or mappings with ``"activations"`` (+ provenance);
* batches with NaN or inf are rejected, counted and logged, never trained on: a rejected batch
  changes no weight, optimiser state, step count, learning rate or initial statistics (its finite
  rows included), so inserting one into the data leaves the result bit for bit the same; once at
  least ``REJECT_LIMIT`` batches are rejected and they are more than three quarters of all batches
  drawn, the run ends with a TrainingError (the data has no usable batches: looping on would never end);
* checkpoints every N steps, written atomically; rerunning with the same
  ``checkpoint_dir`` resumes and gives the same result as an uninterrupted run;
* progress through a callback (tqdm in the CLI, ComfyUI's ProgressBar in nodes);
* data-parallel SAE training under ``torchrun`` (see :mod:`sae_core.distributed`).

Its options, their defaults and the learning-rate schedule are declared in :mod:`sae_core.config`.

Data parallel: when a ``torch.distributed`` process group of several processes
is up, every process trains on its own data (e.g. ``ShardReader(..., rank=r,
world_size=n)``) with DDP semantics. The dictionary is built on each process
from its own first batches and then replaced by rank 0's, so rank 0's init
sample defines the normalisation and ``b_dec``. Each step averages the
gradients over the processes before clipping (one all-reduce of a flat bucket
that also carries the firing counts, the BatchTopK batch threshold and the
logged metrics), so every process holds the same dictionary, optimiser, dead
latent mask and history. A batch with NaN or inf on any process makes every
process skip that step: the bad batches are rejected (the count, the same on
every process, is over all processes) and the good batches of the other
processes wait for the next step, so no good batch is lost and the result is
the one without the bad batches. A process that finds no usable data to start
from, or a batch of another width, stops every process with a TrainingError
(instead of leaving the others waiting). Only rank 0 writes checkpoints while
the others wait; a checkpoint records how many batches each process consumed,
and on resume every process loads the same checkpoint (``checkpoint_dir`` must
be on a filesystem they share) and skips its own count. ITDA grows its
dictionary on one process.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import torch
from safetensors import safe_open
from torch import Tensor

from . import distributed
from .atomic import save_safetensors_atomic
from .config import TrainConfig, options
from .dictionary import Dictionary
from .errors import ConfigError, TrainingError
from .itda import ITDA
from .kernels import SparseCodes, fused_topk_encode, sparse_decode
from .metrics import FiringTracker
from .normalize import fit_standardizer
from .sae import BATCH_TOPK_KINDS, SparseAutoencoder
from .sites.site import Site

log = logging.getLogger("sae_core.train")

Data = Union[Tensor, Callable[[], Iterable], Iterable]
Progress = Callable[[int, int, dict], None]
CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class TrainResult:
    dictionary: Dictionary
    history: list[dict] = field(default_factory=list)
    rejected_batches: int = 0
    resumed_from_step: int | None = None


# ----------------------------------------------------------------------------- data


def _batch_tensor(batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
    if isinstance(batch, Mapping):
        x = batch["activations"]
        provenance = {k: batch[k] for k in ("sample_id", "token", "timestep") if k in batch}
    else:
        x, provenance = batch, {}
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    d = x.shape[-1]
    return x.reshape(-1, d), {k: torch.as_tensor(v).reshape(-1) for k, v in provenance.items()}


def _epochs(data: Data, config: TrainConfig) -> Iterator[Iterator[Any]]:
    """Yield one fresh iterator per pass over the data (infinitely for tensors and
    re-iterables; once for a one-shot iterator)."""
    epoch = 0
    while True:
        if isinstance(data, Tensor):
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            order = torch.randperm(data.shape[0], generator=gen)
            yield (data[order[i:i + config.batch_size]] for i in range(0, data.shape[0], config.batch_size))
        elif callable(data):
            yield iter(data())
        else:
            it = iter(data)
            yield it
            if it is data:  # one-shot iterator: a second pass would be empty
                return
        epoch += 1


class _Stream:
    """Batches with a resumable position: the number of batches consumed."""

    def __init__(self, data: Data, config: TrainConfig, skip: int):
        self._epochs = _epochs(data, config)
        self._current: Iterator[Any] | None = None
        self.consumed = 0
        self._empty_passes = 0
        for _ in range(skip):
            if self.next() is None:
                break

    def next(self) -> Any | None:
        while True:
            if self._current is None:
                self._current = next(self._epochs, None)
                if self._current is None:
                    return None
                self._seen_in_pass = 0
            batch = next(self._current, None)
            if batch is not None:
                self._seen_in_pass += 1
                self.consumed += 1
                return batch
            if self._seen_in_pass == 0:
                return None  # an empty pass: the data is exhausted
            self._current = None


# ----------------------------------------------------------------------------- init


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances, robust to
    the outlier tokens that drag a plain mean (OpenAI and SDLens initialise b_dec so)."""
    median = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - median).norm(dim=-1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - median).norm() < 1e-6 * median.norm().clamp_min(1.0):
            return new
        median = new
    return median


def _build(config: TrainConfig, sample: Tensor, site: Site) -> Dictionary:
    d_in = sample.shape[-1]
    shape = config.dictionary
    standardizer = fit_standardizer(sample, shape.normalization)
    if shape.kind == "itda":
        return ITDA(d_in, shape.k, loss_threshold=config.loss_threshold, max_atoms=config.max_atoms,
                    site=site, standardizer=standardizer)
    sae = SparseAutoencoder(d_in, shape.width(d_in), shape.k, shape.kind, site=site, standardizer=standardizer,
                            seed=config.seed, prefixes=shape.prefixes(d_in))
    xn = standardizer.normalize(sample.float())
    with torch.no_grad():
        if config.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(xn))
        elif config.b_dec_init == "mean":
            sae.b_dec.copy_(xn.mean(0))
    return sae


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, model, optimizer, tracker: FiringTracker, state: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(value)
    tensors.update({f"tracker.{k}": v for k, v in tracker.state().items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    meta = {"state": json.dumps(state), "dictionary": json.dumps(model.config())}
    save_safetensors_atomic(path, tensors, meta)


def _load_checkpoint(path: Path, config: TrainConfig, device: str) -> tuple[Any, dict, dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(meta["state"])
        model_config = json.loads(meta["dictionary"])
    except Exception as err:  # any damage means the same thing to the user
        raise TrainingError(f"{path}: checkpoint is damaged ({err}); delete it to start over") from err
    saved, wanted = TrainConfig.from_dict(state["config"]).flat(), config.flat()
    mismatched = [o.name for o in options(TrainConfig) if not o.resumable and saved[o.name] != wanted[o.name]]
    if mismatched:
        raise ConfigError(
            f"{path} was written with different settings ({', '.join(mismatched)}); "
            "use another checkpoint directory or delete it to start over"
        )
    cls = ITDA if model_config["kind"] == "itda" else SparseAutoencoder
    model = cls.from_config(model_config)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    return model.to(device), state, tensors


# ----------------------------------------------------------------------------- the loop


def train_dictionary(
    data: Data,
    config: TrainConfig | None = None,
    *,
    site: Site | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train a TopK / BatchTopK / Matryoshka BatchTopK SAE or grow an ITDA dictionary on ``data``.

    With ``checkpoint_dir`` the run checkpoints every ``config.checkpoint_every``
    steps and, when started again, resumes from the last checkpoint.

    Under an initialised ``torch.distributed`` process group of several
    processes, trains data-parallel (see the module docstring): every process
    passes its own ``data`` and gets the same :class:`TrainResult`.
    """
    config = config or TrainConfig()
    rank, world = distributed.world()
    if world > 1 and config.dictionary.kind == "itda":
        raise ConfigError("ITDA grows its dictionary on one process: run it without torchrun")
    device = config.device
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None

    state: dict[str, Any] = {"step": 0, "consumed": 0, "rejected": 0, "history": [], "threshold_initialised": False}
    tensors: dict[str, Tensor] = {}
    model = None
    if ckpt_path is not None and ckpt_path.exists():
        model, state, tensors = _load_checkpoint(ckpt_path, config, device)
        if rank == 0:
            log.info("resuming from %s at step %d", ckpt_path, state["step"])
    state["config"] = config.to_dict()
    resumed_from = state["step"] if model is not None else None
    if world > 1:
        _check_same_start(resumed_from, ckpt_path, device)

    stream = _Stream(data, config, skip=_consumed_by(state, rank, world))
    pending: list[Any] = []
    if model is None:
        sample = _init_sample_together(data, stream, pending, config, world, device)
        model = _build(config, sample, site or Site()).to(device)
        if world > 1:  # rank 0's init sample defines normalisation and b_dec for all
            with torch.no_grad():
                distributed.broadcast_([*model.parameters(), *model.buffers()], src=0)
    torch.manual_seed(config.seed)
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])

    # ITDA's atoms are appended, so its tracker is sized for the largest dictionary it may reach.
    tracker = FiringTracker(model.max_atoms if isinstance(model, ITDA) else model.n_latents, device)
    if any(k.startswith("tracker.") for k in tensors):
        tracker.load_state({k[len("tracker."):]: v for k, v in tensors.items() if k.startswith("tracker.")})
    optimizer = None
    if isinstance(model, SparseAutoencoder):
        optimizer = torch.optim.Adam(model.parameters(), lr=config.peak_lr(model.n_latents), betas=config.betas)
        _restore_optimizer(optimizer, model, tensors)

    start = time.perf_counter()
    while state["step"] < config.total_steps:
        batch = pending.pop(0) if pending else stream.next()
        x = provenance = None
        if batch is not None:
            x, provenance = _batch_tensor(batch)
        wrong_width = x is not None and x.shape[-1] != model.d_in
        bad = x is not None and not wrong_width and not torch.isfinite(x).all()
        if world == 1:
            exhausted, n_bad, any_wrong_width = batch is None, int(bad), wrong_width
        else:
            exhausted, n_bad, any_wrong_width = _agree(batch is None, bad, wrong_width, device)
        if any_wrong_width:
            raise _wrong_width(stream.consumed, x.shape[-1] if wrong_width else None, model.d_in)
        if exhausted:
            if batch is None:
                log.warning("data exhausted after %d steps (of %d)%s", state["step"], config.total_steps,
                            f" on rank {rank}" if world > 1 else "")
            else:
                log.info("stopping after %d steps: another rank's data is exhausted", state["step"])
            break
        if n_bad:
            state["rejected"] += n_bad
            if bad:
                log.warning("rejected batch %d: it contains NaN or inf (%d rejected so far)%s", stream.consumed,
                            state["rejected"], f" on rank {rank}; every rank skips this step" if world > 1 else "")
            else:  # another process's batch was rejected: this good one waits for the next step
                pending.insert(0, batch)
            trained = state["step"] * world
            if _too_many_rejected(state["rejected"], trained):
                raise TrainingError(
                    f"{state['rejected']} of the {state['rejected'] + trained} batches drawn contained NaN or inf "
                    "and were rejected: the data has no usable batches (NaN rows are spread by shuffling into every "
                    "batch); remove the damaged shards or capture again")
            continue
        x = x.to(device=device, dtype=torch.float32)
        if isinstance(model, ITDA):
            metrics = _itda_step(model, tracker, x, provenance)
        else:
            metrics = _sae_step(model, optimizer, tracker, x, state, config, world)
        state["step"] += 1
        step = state["step"]
        metrics.update(step=step, rejected_batches=state["rejected"], seconds=round(time.perf_counter() - start, 3))
        if step % config.log_every == 0 or step == config.total_steps:
            if world > 1:  # the only per-process number: take rank 0's, so that histories agree
                metrics["seconds"] = _from_rank0(metrics["seconds"], device)
            state["history"].append(metrics)
            if rank == 0:
                log.info("step %d: %s", step, {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})
        state["consumed"] = stream.consumed - len(pending)
        if ckpt_path is not None and (step % config.checkpoint_every == 0 or step == config.total_steps):
            if world > 1:
                state["consumed_by_rank"] = _gather_counts(state["consumed"], rank, world, device)
            if rank == 0:
                _save_checkpoint(ckpt_path, model, optimizer, tracker, state)
            distributed.barrier()  # nobody runs ahead of a checkpoint being written
        if progress is not None:
            progress(step, config.total_steps, metrics)

    _finalise(model, tracker, state, config)
    return TrainResult(model, state["history"], state["rejected"], resumed_from)


def _check_same_start(resumed_from: int | None, ckpt_path: Path | None, device: str) -> None:
    """Refuse to train when processes would start from different checkpoints."""
    step = torch.tensor([-1 if resumed_from is None else resumed_from] * 2, dtype=torch.float64, device=device)
    step[1].neg_()
    distributed.all_reduce_max_([step])
    if float(step[0]) != -float(step[1]):
        raise TrainingError(
            f"the processes found different checkpoints in {ckpt_path.parent if ckpt_path else None} (steps "
            f"{-float(step[1]):g} to {float(step[0]):g}, -1 for none): put checkpoint_dir on a filesystem that "
            "every process shares"
        )


def _agree(exhausted: bool, bad: bool, wrong_width: bool, device: str) -> tuple[bool, int, bool]:
    """(any process out of data, how many processes hold a non-finite batch, any process's batch of another
    width): every process takes the same branch and counts the same rejections."""
    flags = torch.tensor([float(exhausted), float(bad), float(wrong_width)], dtype=torch.float64, device=device)
    distributed.all_reduce_sum_([flags])
    exhausted, n_bad, wrong_width = flags.tolist()
    return exhausted > 0, int(n_bad), wrong_width > 0


def _wrong_width(consumed: int, width: int | None, d_in: int) -> TrainingError:
    """The batch of another site's width, on this process (``width``) or on another (None)."""
    if width is None:
        return TrainingError(f"another process drew a batch whose width is not the dictionary's d_in={d_in} (see its "
                             "error); all batches must come from one site")
    return TrainingError(f"batch {consumed} has width {width} but the dictionary has d_in={d_in}; all batches must "
                         "come from one site")


def _gather_counts(count: int, rank: int, world: int, device: str) -> list[int]:
    """Every process's ``count``, by rank (an all-reduce of one-hot vectors: exact below 2**53)."""
    counts = torch.zeros(world, dtype=torch.float64, device=device)
    counts[rank] = count
    distributed.all_reduce_sum_([counts])
    return [int(c) for c in counts.tolist()]


def _consumed_by(state: dict, rank: int, world: int) -> int:
    """Batches this process had consumed at the checkpoint. Processes may differ (a good batch waits while
    another process's bad one is rejected); checkpoints of one process, or of earlier versions, hold one count."""
    by_rank = state.get("consumed_by_rank")
    if isinstance(by_rank, list) and len(by_rank) == world:
        return int(by_rank[rank])
    return int(state["consumed"])


def _from_rank0(value: float, device: str) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    distributed.broadcast_([t], src=0)
    return float(t)


REJECT_LIMIT = 100
"""Rejected batches (NaN/inf) before training may give up: then, if they are over three quarters of all batches
drawn. Data with a damaged batch now and then trains on; data whose every batch holds a NaN row (a damaged shard
shuffled into all of them) ends with a clear error instead of a loop."""


def _too_many_rejected(rejected: int, trained: int) -> bool:
    return rejected >= REJECT_LIMIT and rejected > 3 * trained


def _init_sample_together(data: Data, stream: _Stream, pending: list, config: TrainConfig, world: int,
                          device: str) -> Tensor:
    """:func:`_init_sample` on every process; if any process cannot start (no usable data, a batch of another
    width), every process raises (the others would otherwise wait for it forever in the broadcast of rank 0's
    dictionary)."""
    if world == 1:
        return _init_sample(data, stream, pending, config)
    try:
        sample, error = _init_sample(data, stream, pending, config), None
    except TrainingError as err:
        sample, error = None, err
    failed = torch.tensor([float(error is not None)], device=device)
    distributed.all_reduce_max_([failed])
    if error is not None:
        raise error
    if float(failed):
        raise TrainingError("another process could not start training (see its error): every process needs "
                            "finite batches of one width; check that process's data")
    return sample


def _init_sample(data: Data, stream: _Stream, pending: list, config: TrainConfig) -> Tensor:
    """Activations to fit normalisation and b_dec on: a seeded random subset of a
    tensor, or the first batches of a stream (which are then trained on as usual).

    A stream's batches with NaN or inf are left out whole, finite rows included: the training loop rejects
    them, and a rejected batch must not shape the dictionary through its statistics either."""
    if isinstance(data, Tensor):
        gen = torch.Generator().manual_seed(config.seed)
        idx = torch.randperm(data.shape[0], generator=gen)[: config.init_tokens]
        sample = data.reshape(-1, data.shape[-1])[idx].float()
        sample = sample[torch.isfinite(sample).all(-1)]  # as for streams: NaN rows must not set the normalisation
        if not len(sample):
            raise TrainingError("no finite activations to train on: the data is empty or all NaN/inf")
        return sample
    rows: list[Tensor] = []
    width: int | None = None
    count = unusable = 0
    while count < config.init_tokens and not _too_many_rejected(unusable, len(pending) - unusable):
        batch = stream.next()
        if batch is None:
            break
        pending.append(batch)
        x, _ = _batch_tensor(batch)
        if width is not None and x.shape[-1] != width:
            raise _wrong_width(stream.consumed, x.shape[-1], width)
        width = x.shape[-1]
        if not x.shape[0] or not torch.isfinite(x).all():
            unusable += 1  # bounded like rejections: a stream of empty or NaN batches must not keep us here
            continue
        rows.append(x.float())
        count += x.shape[0]
    if not count:
        raise TrainingError("no finite activations to train on: the data source is empty or all NaN/inf")
    return torch.cat(rows)[: config.init_tokens]


def _restore_optimizer(optimizer: torch.optim.Optimizer, model, tensors: dict[str, Tensor]) -> None:
    for name, p in model.named_parameters():
        if f"optim.{name}.exp_avg" in tensors:
            optimizer.state[p] = {
                "step": tensors[f"optim.{name}.step"].to(torch.float32),
                "exp_avg": tensors[f"optim.{name}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"].to(p.device),
            }


def _sae_step(sae: SparseAutoencoder, optimizer, tracker: FiringTracker, x: Tensor, state: dict, config: TrainConfig,
              world: int = 1) -> dict:
    for group in optimizer.param_groups:
        group["lr"] = config.peak_lr(sae.n_latents) * config.lr_factor(state["step"])
    xn = sae.standardizer.normalize(x)
    k_aux = (sae.d_in // 2 if config.auxk is None else config.auxk)
    dead = tracker.dead_mask(config.dead_tokens) if k_aux else None
    enc = fused_topk_encode(
        xn - sae.b_dec, sae.W_enc, sae.b_enc, sae.k,
        batch_topk=sae.kind in BATCH_TOPK_KINDS, dead_mask=dead, k_aux=k_aux,
        compute_dtype=getattr(torch, config.compute_dtype),
    )
    fvus, recon = prefix_fvus(enc.codes, sae.W_dec, sae.b_dec, xn, sae.prefixes)
    loss = fvus[-1]  # the whole dictionary's FVU: what every kind logs
    aux_loss = torch.zeros(())
    if enc.aux is not None:
        residual = (xn - recon).detach()
        # The AuxK reconstruction has no decoder bias: adding b_dec here would count it twice.
        aux_recon = sparse_decode(enc.aux, sae.W_dec)
        aux_loss = (aux_recon - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    total = fvus.mean() + config.auxk_coef * aux_loss
    if world > 1:
        return _sae_step_parallel(sae, optimizer, tracker, enc, loss, aux_loss, total, state, config, world)
    if not torch.isfinite(total):
        raise _diverged(state, total.item())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    sae.remove_parallel_decoder_grad_()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
    optimizer.step()
    sae.normalize_decoder_()
    tracker.update(enc.codes)
    if enc.threshold is not None:
        with torch.no_grad():
            if not state["threshold_initialised"]:
                sae.threshold.fill_(float(enc.threshold))
                state["threshold_initialised"] = True
            else:
                m = config.threshold_momentum
                sae.threshold.mul_(m).add_((1 - m) * enc.threshold.to(sae.threshold.device))
    return {
        "fvu": loss.item(),
        "aux_loss": aux_loss.item(),
        "l0": float((enc.codes.values > 0).sum(-1).float().mean()),
        "dead_fraction": tracker.dead_fraction(config.dead_tokens),
        "lr": optimizer.param_groups[0]["lr"],
        "tokens": tracker.tokens,
    }


def prefix_fvus(codes: SparseCodes, w_dec: Tensor, b_dec: Tensor, xn: Tensor,
                prefixes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The FVU of reconstructing ``xn`` from each prefix's latents alone, ``(len(prefixes),)``, and the whole
    dictionary's reconstruction (the last prefix holds every latent).

    Prefix ``m`` decodes only the codes with index below ``m``, plus ``b_dec``; every FVU divides by the
    batch's total variance. Training minimises the mean of these (Matryoshka: early latents must reconstruct
    on their own, so they learn the general features); one prefix, ``(n_latents,)``, is the plain FVU."""
    total_var = (xn - xn.mean(0)).pow(2).sum().clamp_min(1e-12)
    values, indices = codes
    fvus = []
    for size in prefixes[:-1]:
        partial = sparse_decode(SparseCodes(values * (indices < size), indices), w_dec) + b_dec
        fvus.append((partial - xn).pow(2).sum() / total_var)
    recon = sparse_decode(codes, w_dec) + b_dec
    fvus.append((recon - xn).pow(2).sum() / total_var)
    return torch.stack(fvus), recon


def _diverged(state: dict, loss: float) -> TrainingError:
    return TrainingError(
        f"training diverged at step {state['step']} (loss is {loss}); lower the learning rate "
        "or check the activations; the last checkpoint is untouched"
    )


def _sae_step_parallel(sae: SparseAutoencoder, optimizer, tracker: FiringTracker, enc, loss: Tensor, aux_loss: Tensor,
                       total: Tensor, state: dict, config: TrainConfig, world: int) -> dict:
    """The rest of :func:`_sae_step` over several processes, with one all-reduce.

    The flat bucket holds the gradients (averaged: DDP semantics), this
    process's firing counts, activation sums and token count (summed, so every
    tracker, hence every dead-latent mask, stays the same) and the loss,
    metrics and BatchTopK batch threshold (averaged)."""
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    params = list(sae.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    n = tracker.fire_count.shape[0]
    counts, sums, n_tokens, l0 = _firing_delta(enc.codes, n)
    threshold = enc.threshold if enc.threshold is not None else torch.zeros(())
    device = grads[0].device
    scalars = torch.stack([t.detach().reshape(()).to(device=device, dtype=torch.float32) for t in (
        total, loss, aux_loss, l0, threshold)])
    n_tokens = torch.tensor([float(n_tokens)], device=device)
    bucket = torch.cat([*(g.detach().reshape(-1).float() for g in grads), scalars, counts.to(device),
                        sums.to(device=device, dtype=torch.float32), n_tokens])
    distributed.all_reduce_sum_([bucket])
    offset = 0
    for p, g in zip(params, grads):
        size = g.numel()
        p.grad = bucket[offset:offset + size].view_as(g).to(g.dtype).div_(world)
        offset += size
    *means, tokens = torch.cat([bucket[offset:offset + 5].double() / world, bucket[-1:].double()]).tolist()
    total_mean, fvu, aux_mean, l0, threshold_mean = means
    tokens = int(round(tokens))
    offset += 5
    counts, sums = bucket[offset:offset + n], bucket[offset + n:offset + 2 * n]
    if not math.isfinite(total_mean):
        raise _diverged(state, total_mean)
    sae.remove_parallel_decoder_grad_()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
    optimizer.step()
    sae.normalize_decoder_()
    _apply_firing(tracker, counts, sums, tokens)
    if enc.threshold is not None:
        with torch.no_grad():
            if not state["threshold_initialised"]:
                sae.threshold.fill_(threshold_mean)
                state["threshold_initialised"] = True
            else:
                m = config.threshold_momentum
                sae.threshold.mul_(m).add_((1 - m) * threshold_mean)
    return {
        "fvu": fvu,
        "aux_loss": aux_mean,
        "l0": l0,
        "dead_fraction": tracker.dead_fraction(config.dead_tokens),
        "lr": optimizer.param_groups[0]["lr"],
        "tokens": tracker.tokens,
    }


def _firing_delta(codes, n_latents: int) -> tuple[Tensor, Tensor, int, Tensor]:
    """What :meth:`FiringTracker.update` would add for ``codes``: per-latent firing counts,
    activation sums, the token count, plus the batch's mean L0."""
    values = codes.values.detach().reshape(-1, codes.values.shape[-1])
    indices = codes.indices.reshape(-1, codes.indices.shape[-1])
    active = values > 0
    idx = indices[active]
    counts = torch.bincount(idx, minlength=n_latents).to(torch.float32)
    sums = torch.zeros(n_latents, dtype=torch.float64, device=idx.device).index_add_(0, idx, values[active].double())
    return counts, sums, values.shape[0], active.sum(-1).float().mean()


def _apply_firing(tracker: FiringTracker, counts: Tensor, sums: Tensor, tokens: int) -> None:
    """:meth:`FiringTracker.update` from counts summed over every process's batch."""
    tracker.fire_count += counts.to(tracker.fire_count.dtype)
    tracker.activation_sum += sums.to(tracker.activation_sum.dtype)
    tracker.tokens_since_fired += tokens
    tracker.tokens_since_fired[counts > 0] = 0
    tracker.tokens += tokens


def _itda_step(itda: ITDA, tracker: FiringTracker, x: Tensor, provenance: dict[str, Tensor]) -> dict:
    grown = itda.grow(x, provenance or None)
    tracker.update(grown["codes"])
    # ITDA's loss is the mean per-input relative error, ||x - x_hat||^2 / ||x||^2 (not an FVU).
    return {"relative_loss": grown["loss"], "atoms": itda.n_latents, "added": grown["added"], "tokens": tracker.tokens}


def _finalise(model, tracker: FiringTracker, state: dict, config: TrainConfig) -> None:
    """Store firing statistics and a training summary with the dictionary."""
    if tracker.tokens:
        n = model.n_latents
        with torch.no_grad():
            model.firing_frequency.copy_(tracker.firing_frequency()[:n])
            model.mean_activation.copy_(tracker.mean_activation()[:n])
    last = state["history"][-1] if state["history"] else {}
    model.metadata.update(
        training={
            "steps": state["step"],
            "rejected_batches": state["rejected"],
            "final": {k: v for k, v in last.items() if isinstance(v, (int, float))},
            "config": config.to_dict(),
        }
    )
