"""Training the organisms' denoisers and classifier: the recipe, written so that a killed run resumes.

The trainer's side of :mod:`organism`: the models, data and encoder it trains live there (the plugin
shares them); fitting needs ``sae_core``'s atomic writes, so it stays here.

Flux: rectified flow, ``x_t = (1 - t) x_0 + t eps`` with ``t`` logit-normal (SD3's choice), the
transformer predicting ``eps - x_0``. U-Net: DDPM v-prediction at uniform timesteps, zero terminal SNR. Both:
AdamW, linear warm-up then cosine decay, 10% of captions dropped to the empty prompt (so guidance
works), gradient clipping at 1, and an exponential moving average of the weights, which is what is
saved. A checkpoint (weights, EMA, optimiser, RNG, step) is written atomically every
``checkpoint_every`` steps; rerunning with the same ``work_dir`` continues from it.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from organism.classifier import build_classifier
from organism.data import Dataset
from organism.models import DDPM_CONFIG, build_flux, build_unet, flux_velocity, pack, to_latent
from organism.text import shared_encoder
from sae_core import TrainingError
from sae_core.atomic import atomic_write

log = logging.getLogger("training.organism_fit")
KINDS = ("flux", "unet")


@dataclass
class FitConfig:
    kind: str = "flux"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    ema: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    device: str = "cpu"


def _lr(step: int, config: FitConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _flux_loss(model, x0: Tensor, tokens: Tensor, pooled: Tensor, gen: torch.Generator) -> Tensor:
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen)).to(x0.device)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    pred = flux_velocity(model, pack(xt), t, tokens, pooled)
    return torch.nn.functional.mse_loss(pred, pack(noise - x0))


def _unet_loss(model, x0: Tensor, tokens: Tensor, alphas_cumprod: Tensor, gen: torch.Generator) -> Tensor:
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=gen)
    a = alphas_cumprod[t].to(x0.device).view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = model(xt, t.to(x0.device), encoder_hidden_states=tokens, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred, a.sqrt() * noise - (1 - a).sqrt() * x0)


def ddpm_alphas_cumprod() -> Tensor:
    """The training schedule, as diffusers' DDPMScheduler builds it from DDPM_CONFIG."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**DDPM_CONFIG).alphas_cumprod.float()


def _save(path: Path, payload: dict) -> None:
    def write(tmp: Path) -> None:
        torch.save(payload, tmp)

    atomic_write(path, write)


def fit(dataset: Dataset, config: FitConfig, work_dir: Path,
        progress: Optional[Callable[[int, int, float], None]] = None) -> torch.nn.Module:
    """Train one organism on ``dataset``; returns the EMA model (also resumable from ``work_dir``)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / f"{config.kind}_checkpoint.pt"
    model = (build_flux if config.kind == "flux" else build_unet)(config.seed).to(config.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    step, history = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location=config.device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, history = int(state["step"]), json.loads(state["history"])
        log.info("resuming %s from step %d", config.kind, step)

    encoder = shared_encoder()
    captions = sorted(set(dataset.captions))
    encoded = encoder(captions + [""])
    row = {c: i for i, c in enumerate(captions)}
    caption_ids = torch.tensor([row[c] for c in dataset.captions])
    empty = len(captions)
    latents = to_latent(dataset.images)
    alphas = ddpm_alphas_cumprod()
    start, running = time.perf_counter(), None
    model.train()
    while step < config.steps:
        idx = torch.randint(0, len(dataset), (config.batch_size,), generator=gen)
        ids = caption_ids[idx].clone()
        ids[torch.rand(len(ids), generator=gen) < config.caption_dropout] = empty
        x0 = latents[idx].to(config.device)
        tokens, pooled = encoded.tokens[ids].to(config.device), encoded.pooled[ids].to(config.device)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config)
        if config.kind == "flux":
            loss = _flux_loss(model, x0, tokens, pooled, gen)
        else:
            loss = _unet_loss(model, x0, tokens, alphas, gen)
        if not torch.isfinite(loss):
            raise TrainingError(f"organism training diverged at step {step}: lower --lr (the last checkpoint is intact)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(config.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == config.steps:
            history.append({"step": step, "loss": round(running, 5), "seconds": round(time.perf_counter() - start, 1)})
        if progress is not None:
            progress(step, config.steps, running)
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save(ckpt, {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "generator": gen.get_state(), "step": step, "history": json.dumps(history),
                         "config": json.dumps(asdict(config))})
    ema.history = history
    return ema.eval()


def train_classifier(train: Dataset, epochs: int = 6, batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    """AdamW with one-cycle decay and light shift augmentation (generated images are not centred exactly)."""
    torch.manual_seed(seed)
    model = build_classifier()
    steps = epochs * (len(train) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for i in range(len(train) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = train.images[idx]
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(x), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()
