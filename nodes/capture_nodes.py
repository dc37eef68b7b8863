"""Capture Activations: record a site's activations, into shards on disk or a bounded memory buffer,
while the graph's sampler runs."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from comfy_api.latest import io

from ..sae_core import (ActivationBuffer, InputError, Record, Recorder, ShardError, ShardReader, ShardWriter, Site,
                        SiteContext, write_records)
from ..sae_core.shards import DTYPES
from .common import (CAPTURE, CATEGORY, check_choices, output_folder, paths_named_from_output, require_choices,
                     resolve_site, site_input, window, window_inputs)

DESTINATIONS = ("shards", "memory")


class Capture:
    """An ``SAE_CAPTURE`` handle: where the vectors go, and how many are there.

    Recording is the engine's :class:`~sae_core.recording.Recorder` (the same as the headless
    capture: per-sample token subsets, NaN for an unknown sigma). Each sampling run is a generation
    whose samples continue the numbering of what is stored; its vectors are streamed out at every
    model call, to shards in ``directory`` (closed, i.e. the last partial shard written, when the run
    ends) or, with ``directory=None``, to a memory buffer of at most ``max_vectors`` that refuses an
    overflowing step with a clear error."""

    def __init__(self, directory: Optional[Path], site: Site, fraction: float, cond_only: bool,
                 window: Optional[tuple[float, float]], dtype: torch.dtype, seed: int = 0, max_vectors: int = 0):
        self.directory, self.site, self.dtype = directory, site, dtype
        self.recorder = Recorder(window=window, token_fraction=fraction, cond_only=cond_only, seed=seed,
                                 stream=self._store)
        self.buffer = ActivationBuffer(max_vectors) if directory is None else None
        self.settings = {"capture": {"source": "comfyui", "window": list(window) if window else None,
                                     "token_fraction": float(fraction), "cond_only": bool(cond_only), "seed": int(seed)}}
        """The manifest's provenance, in the headless capture's layout (``capture`` settings)."""
        self._writer: Optional[ShardWriter] = None
        self._next_sample = 0

    def begin(self, batch: int) -> None:
        """A sampling run of ``batch`` samples starts."""
        if self.buffer is None:
            with paths_named_from_output():
                self._writer = ShardWriter(self.directory, self.site, dtype=self.dtype, extra=self.settings)
            self._next_sample = self._writer.next_sample_id
        self.recorder.begin(range(self._next_sample, self._next_sample + batch))
        self._next_sample += batch

    def record(self, h: torch.Tensor, ctx: SiteContext) -> torch.Tensor:
        return self.recorder(h, ctx)

    def _store(self, record: Record) -> None:
        sink = self.buffer if self.buffer is not None else self._writer
        if sink is None:
            raise InputError("Capture Activations ran outside a sampler: connect its MODEL to a KSampler")
        write_records(sink, [record], self.recorder.sample_ids)

    def finish(self) -> None:
        self.recorder.take()
        if self._writer is not None:
            self._writer, writer = None, self._writer
            with paths_named_from_output():
                writer.close()

    @property
    def n_vectors(self) -> int:
        """Vectors captured so far (in memory, or in shards on disk plus any of a run still going)."""
        if self.buffer is not None:
            return len(self.buffer)
        if self._writer is not None:
            return self._writer.n_tokens
        try:
            return ShardReader(self.directory, batch_size=1, shuffle=False).n_tokens
        except ShardError:
            return 0

    def __repr__(self) -> str:
        return f"Capture({self.directory or 'memory'}, site={self.site}, vectors={self.n_vectors})"


def capture_while_sampling(adapter, model, site: Site, capture: Capture):
    """A clone of ``model`` that feeds ``site``'s tokens to ``capture`` and closes each sampling run's shards
    when the run ends (an ``OUTER_SAMPLE`` wrapper: it sees the batch size before the first model call)."""
    import comfy.patcher_extension

    def finish_after_sampling(executor, *args, **kwargs):
        noise = args[0] if args else kwargs.get("noise")
        capture.begin(int(noise.shape[0]) if isinstance(noise, torch.Tensor) else 1)
        try:
            return executor(*args, **kwargs)
        finally:
            capture.finish()

    patched = adapter.patch(model, {site: capture.record})
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "diffusion_sae_capture",
                                 finish_after_sampling)
    return patched


class SAECaptureActivations(io.ComfyNode):
    """A clone of MODEL whose sampling records one site's activations, for Train Dictionary."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAECaptureActivations",
            display_name="Capture Activations",
            category=f"{CATEGORY}/capture",
            description=("Records one site's activations while the sampler this MODEL goes to runs: into shards "
                         "in ComfyUI's output folder, or into a bounded memory buffer. Connect the capture to "
                         "Train Dictionary, and the sampler's LATENT to its 'after' input."),
            inputs=[
                io.Model.Input("model", tooltip="the model to record from (a patched clone is returned)"),
                site_input("double_blocks.1:image"),
                *window_inputs(0.0, 1.0, "record"),
                io.Float.Input("token_fraction", default=1.0, min=0.001, max=1.0, step=0.001,
                               tooltip="random share of each image's tokens to keep (seeded per sample)"),
                io.Boolean.Input("cond_only", default=True,
                                 tooltip="keep only the positive prompt's rows (off: the negative's too)"),
                io.String.Input("folder", default="sae_activations/run1",
                                tooltip="shards folder inside ComfyUI's output folder; a rerun adds to it (unused when "
                                        "destination is memory)"),
                io.Combo.Input("dtype", options=list(DTYPES),
                               tooltip="precision the shards store the vectors in (unused when destination is "
                                       "memory: the buffer keeps the model's own)"),
                io.Combo.Input("destination", options=list(DESTINATIONS), optional=True,
                               tooltip="shards: files in the folder; memory: RAM only, at most max_vectors"),
                io.Int.Input("max_vectors", default=1_000_000, min=1, max=2**31 - 1, optional=True,
                             tooltip="memory destination: the most vectors kept; a step that would overflow is an error"),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="the recording clone of the model"),
                     CAPTURE.Output(display_name="capture", tooltip="what was recorded, for Train Dictionary")],
        )

    @classmethod
    def validate_inputs(cls, dtype: Optional[str] = None, destination: Optional[str] = None) -> bool | str:
        return check_choices(cls, dtype=dtype, destination=destination)

    @classmethod
    def execute(cls, model, site: str, window_start: float, window_end: float, token_fraction: float,
                cond_only: bool, folder: str, dtype: str, destination: str = "shards",
                max_vectors: int = 1_000_000) -> io.NodeOutput:
        require_choices(cls, dtype=dtype, destination=destination)
        adapter, where, _ = resolve_site(model, site)
        directory = output_folder(folder) if destination == "shards" else None
        gate = window(window_start, window_end)
        capture = Capture(directory, dataclasses.replace(where, timestep_window=gate), token_fraction, cond_only,
                          gate, DTYPES[dtype], max_vectors=max_vectors)
        return io.NodeOutput(capture_while_sampling(adapter, model, where, capture), capture)
