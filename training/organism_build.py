"""Rebuilding the organism: train the denoisers and the classifier, save them where the code finds them.

``python -m training organism --out DIR`` runs this; the committed weights in
``organism/weights`` were made by it (BENCHMARKS.md has the command, time and samples).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from organism.classifier import FILE, accuracy
from organism.data import CLASSES, Dataset, class_prompt, organism_data
from sae_core.atomic import save_safetensors_atomic

from .organism_fit import FitConfig, fit, train_classifier


def sample_grid(pipe, path: Path, per_class: int = 6, steps: int = 20, seed: int = 0) -> None:
    """A PNG: one row per class, ``per_class`` samples of its plain prompt."""
    from PIL import Image

    prompts = [class_prompt(c) for c in range(len(CLASSES)) for _ in range(per_class)]
    images = pipe(prompts, num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images
    grid = images[:, 0].reshape(len(CLASSES), per_class, 32, 32).permute(0, 2, 1, 3).reshape(len(CLASSES) * 32, per_class * 32)
    Image.fromarray((grid * 255).round().byte().numpy(), mode="L").resize((per_class * 64, len(CLASSES) * 64), Image.NEAREST).save(path)


def build_denoiser(kind: str, out: Path, work: Path, config: Optional[FitConfig] = None) -> dict:
    """Train one organism denoiser and save it as a diffusers pipeline folder ``out/kind``."""
    from organism.pipelines import OrganismFluxPipeline, OrganismUNetPipeline, flux_scheduler, unet_scheduler

    config = config or FitConfig(kind=kind)
    train, _ = organism_data(config.seed)
    bar = tqdm(total=config.steps, desc=f"organism {kind}", unit="step")

    def progress(step: int, total: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}")

    start = time.perf_counter()
    model = fit(train, config, work, progress)
    bar.close()
    seconds = time.perf_counter() - start
    if kind == "flux":
        pipe = OrganismFluxPipeline(transformer=model, scheduler=flux_scheduler())
    else:
        pipe = OrganismUNetPipeline(unet=model, scheduler=unet_scheduler())
    pipe.set_progress_bar_config(disable=True)
    folder = out / kind
    pipe.to(torch.float16).save_pretrained(folder)
    pipe.to(torch.float32)
    sample_grid(pipe, out / f"{kind}_samples.png")
    record = {"kind": kind, "config": config.__dict__, "seconds_this_run": round(seconds, 1),
              "history": model.history, "torch_threads": torch.get_num_threads()}
    (out / f"{kind}_training.json").write_text(json.dumps(record, indent=1))
    return record


def save_classifier(model: torch.nn.Module, folder: Path) -> Path:
    path = folder / FILE
    save_safetensors_atomic(path, model.state_dict(), {"classes": ",".join(CLASSES)})
    return path


def fit_and_report(train: Dataset, held_out: Dataset, folder: Path) -> dict:
    """Train the classifier, save it to ``folder`` and report its held-out accuracy."""
    start = time.perf_counter()
    model = train_classifier(train)
    save_classifier(model, folder)
    return {"held_out_accuracy": round(accuracy(model, held_out), 4), "seconds": round(time.perf_counter() - start, 1)}
