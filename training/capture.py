"""Capture: generate images from prompts and store the chosen sites' activations as shards.

One shard directory per site (``OUT/<block>-<stream>/``, see :class:`sae_core.ShardWriter`), each with
the run's settings in its manifest. Sample ``s`` is image ``s % images_per_prompt`` of prompt
``s // images_per_prompt``, drawn from noise seeded ``seed + s``, so any sample can be regenerated and a
rerun after a kill continues at the first sample not yet on disk, with the same images it would have
made. A capture whose settings differ from the directory's is refused rather than mixed in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from sae_core import ConfigError, InputError, Recorder, ScheduleError, Site, validate_window, write_records
from sae_core.shards import DTYPES, ShardWriter

from .runner import Runner

log = logging.getLogger("training.capture")


def site_dir(out: Path, site: Site) -> Path:
    return out / site.name.replace(":", "-")


@dataclass
class CaptureSettings:
    """What makes two captures the same data: stored in each manifest and checked on resume."""

    model: str
    prompts: list[str]
    images_per_prompt: int = 1
    seed: int = 0
    steps: Optional[int] = None
    guidance: Optional[float] = None
    window: Optional[tuple[float, float]] = None
    tokens_per_image: Optional[int] = None
    cond_only: bool = True

    def manifest(self) -> dict[str, Any]:
        return {"capture": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}}

    @property
    def n_samples(self) -> int:
        return len(self.prompts) * self.images_per_prompt


def capture(runner: Runner, settings: CaptureSettings, sites: Sequence[Site], out: Path, *, batch_size: int = 8,
            shard_tokens: int = 65536, dtype: str = "float16", progress: bool = True) -> dict[str, Any]:
    """Run the capture (resuming whatever ``out`` holds); returns a summary with token counts per site."""
    if settings.images_per_prompt < 1:
        raise ConfigError("images_per_prompt must be at least 1")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: generate at least 1 image at a time")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    window = validate_window(settings.window)
    writers: dict[Site, ShardWriter] = {}
    for site in sites:
        where = site_dir(out, site)
        writers[site] = ShardWriter(where, site, shard_tokens=shard_tokens, dtype=DTYPES[dtype],
                                    extra=settings.manifest(), whole_adds=True)
    resume_from = {site: w.next_sample_id for site, w in writers.items()}  # sites may stand at different samples
    start = min(resume_from.values())
    total = settings.n_samples
    if start:
        log.info("resuming the capture in %s at sample %d of %d", out, start, total)
    recorders = {site: Recorder(window=window, tokens_per_image=settings.tokens_per_image, cond_only=settings.cond_only,
                                 seed=settings.seed) for site in sites}
    bar = tqdm(total=total, initial=min(start, total), desc="capture", unit="image", disable=not progress)
    try:
        for first in range(start, total, batch_size):
            ids = list(range(first, min(first + batch_size, total)))
            prompts = [settings.prompts[s // settings.images_per_prompt] for s in ids]
            for recorder in recorders.values():
                recorder.begin(ids)
            runner.generate(prompts, [settings.seed + s for s in ids], steps=settings.steps,
                            guidance=settings.guidance, site_functions=recorders)
            for site, recorder in recorders.items():
                write_records(writers[site], recorder.take(), torch.tensor(ids), resume_from[site])
            bar.update(len(ids))
    finally:
        bar.close()
        for writer in writers.values():
            writer.close()
    summary = {site.name: {"directory": str(site_dir(out, site)), "tokens": writers[site].n_tokens} for site in sites}
    for site in sites:
        if not writers[site].n_tokens:
            raise ScheduleError(f"no activations were captured at {site.name}: is the window {settings.window} "
                                  "outside the sampling schedule?")
    return summary


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(folder: Path) -> list[Path]:
    """The folder's pictures in name order; a clear error when there is no folder or no picture."""
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def capture_images(runner: Runner, folder: Path, sites: Sequence[Site], out: Path, *, levels: Sequence[float] = (0.5,),
                   prompt: str = "", seed: int = 0, shard_tokens: int = 65536, dtype: str = "float16",
                   progress: bool = True) -> dict[str, Any]:
    """Revelio's route: real images noised to each of ``levels`` (sampling progress of a 20-step schedule),
    one denoiser pass each, the sites' tokens stored with sample id = the image's index in name order."""
    files = image_files(folder)
    outside = [level for level in levels if not 0.0 <= level <= 1.0]
    if outside:
        raise ScheduleError(f"noise levels {outside} lie outside 0..1: a level is sampling progress, 0 = pure noise, "
                            "1 = the last step")
    settings = {"capture": {"model": runner.name, "images": [p.name for p in files], "levels": list(levels),
                            "prompt": prompt, "seed": seed}}
    recorders = {site: Recorder(seed=seed) for site in sites}
    writers = {}
    for site in sites:
        writers[site] = ShardWriter(site_dir(out, site), site, shard_tokens=shard_tokens, dtype=DTYPES[dtype],
                                    extra=settings, whole_adds=True)
    resume_from = {site: w.next_sample_id for site, w in writers.items()}
    try:
        for index in tqdm(range(min(resume_from.values()), len(files)), desc="capture images", unit="image",
                          disable=not progress):
            image = runner.load_image(files[index])
            for recorder in recorders.values():
                recorder.begin([index])
            for level in levels:
                runner.denoise_once(image, prompt, level, seed + index, recorders)
            for site, recorder in recorders.items():
                write_records(writers[site], recorder.take(), torch.tensor([index]), resume_from[site])
    finally:
        for writer in writers.values():
            writer.close()
    return {site.name: {"directory": str(site_dir(out, site)), "tokens": writers[site].n_tokens} for site in sites}
