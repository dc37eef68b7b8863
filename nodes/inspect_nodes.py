"""Record Features, Feature Heatmap, Top Features: which dictionary features fire where in a sample."""
from __future__ import annotations

from typing import Optional

import torch
from comfy_api.latest import io, ui

from ..sae_core import Dictionary, InputError, Recorder, SiteContext
from .adapters import patch_site
from ..sae_core.inspection import feature_map, overlay_heatmap, top_features
from ..sae_core.plots import bar_chart
from .common import (CATEGORY, DICTIONARY, RECORDING, checked_images, pil_to_image, require_linked, site_input, window,
                     window_inputs)


class Recording:
    """An ``SAE_RECORDING`` handle: the site's tokens of the first prompt row at the last model call inside
    the window (the engine's :class:`~sae_core.recording.Recorder`, ``keep="last"``), and their dense
    feature activations ``(tokens, n_latents)``, encoded once when first asked for."""

    def __init__(self, dictionary, window: Optional[tuple[float, float]]):
        self.dictionary = dictionary
        self.recorder = Recorder(window=window, keep="last")
        self._dense: Optional[torch.Tensor] = None

    def record(self, h: torch.Tensor, ctx: SiteContext) -> torch.Tensor:
        self._dense = None
        return self.recorder(h, ctx)

    @property
    def grid(self) -> Optional[tuple[int, int]]:
        return self.recorder.records[0].grid if self.recorder.records else None

    @property
    def activations(self) -> Optional[torch.Tensor]:
        if self._dense is None and self.recorder.records:
            tokens = self.recorder.records[0].acts[0]
            with torch.no_grad():
                self._dense = self.dictionary.dense_codes(tokens.to(_device(self.dictionary))).float().cpu()
        return self._dense

    def require(self) -> torch.Tensor:
        if self.activations is None:
            raise InputError("the recording is empty: sample with the recording MODEL first (connect this node's "
                             "image to the sampler's output) and check the window")
        return self.activations


def _device(module: torch.nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class SAERecordFeatures(io.ComfyNode):
    """A clone of MODEL whose sampling records which dictionary features fire on each token."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAERecordFeatures",
            display_name="Record Features",
            category=f"{CATEGORY}/inspect",
            description=("Records which dictionary features fire on each token of one site while the sampler this "
                         "MODEL goes to runs (the prompt's first image, at the last step inside the window), for "
                         "Feature Heatmap and Top Features. Sampling itself is unchanged."),
            inputs=[
                io.Model.Input("model", tooltip="the model to record from (a patched clone is returned)"),
                DICTIONARY.Input("dictionary", tooltip="a dictionary trained on this site"),
                site_input("double_blocks.1:image"),
                *window_inputs(1.0, 1.0, "record"),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="the recording clone of the model"),
                     RECORDING.Output(display_name="recording", tooltip="the feature activations, after sampling")],
        )

    @classmethod
    def execute(cls, model, dictionary, site: str, window_start: float, window_end: float) -> io.NodeOutput:
        require_linked(dictionary, Dictionary, "dictionary", "Load Dictionary or Train Dictionary")
        recording = Recording(dictionary, window(window_start, window_end))
        patched, _ = patch_site(model, site, recording.record, width=dictionary.d_in)
        return io.NodeOutput(patched, recording)


class SAEFeatureHeatmap(io.ComfyNode):
    """One feature's activation over the image, laid over the sampled picture."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAEFeatureHeatmap",
            display_name="Feature Heatmap",
            category=f"{CATEGORY}/inspect",
            description=("Paints where one feature fired (from Record Features) over the sampled image, in red, "
                         "brighter where it fired more."),
            inputs=[
                io.Image.Input("image", tooltip="the sampled image (connecting it makes this run after sampling)"),
                RECORDING.Input("recording", tooltip="Record Features' recording of the same sampling"),
                io.Int.Input("feature", default=0, min=0, max=1 << 24, tooltip="the feature id to show"),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="how strongly the heat covers the image where the feature peaks"),
            ],
            outputs=[io.Image.Output(tooltip="the image with the feature's heat laid over it")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image: torch.Tensor, recording: Recording, feature: int, opacity: float) -> io.NodeOutput:
        require_linked(recording, Recording, "recording", "Record Features")
        image = checked_images(image, "image")
        heat = feature_map(recording.require(), feature, recording.grid)
        overlaid = overlay_heatmap(image, heat, opacity)
        return io.NodeOutput(overlaid, ui=ui.PreviewImage(overlaid, cls=cls))


class SAETopFeatures(io.ComfyNode):
    """The features that fired most over the recorded image, as text and a chart."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAETopFeatures",
            display_name="Top Features",
            category=f"{CATEGORY}/inspect",
            description=("Lists the features of highest mean activation in a Record Features recording, with the "
                         "share of tokens each fired on, and charts them."),
            inputs=[
                io.Image.Input("image", tooltip="the sampled image (connecting it makes this run after sampling)"),
                RECORDING.Input("recording", tooltip="Record Features' recording of the same sampling"),
                io.Int.Input("n", default=10, min=1, max=256, tooltip="how many features to list"),
            ],
            outputs=[io.String.Output(display_name="features", tooltip="one line per feature: id, mean, share"),
                     io.Image.Output(display_name="chart", tooltip="a bar chart of their mean activations"),
                     io.String.Output(display_name="feature_ids",
                                      tooltip="their ids, comma-separated: connect to Steer's features input")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image: torch.Tensor, recording: Recording, n: int) -> io.NodeOutput:
        require_linked(recording, Recording, "recording", "Record Features")
        top = top_features(recording.require(), n)
        text = "\n".join(f"{t.feature}: mean {t.mean:.4g}, fires on {t.share:.0%} of tokens" for t in top)
        chart = pil_to_image(bar_chart([f"#{t.feature}" for t in top], [t.mean for t in top],
                                       "top features", x_label="mean activation over the tokens"))
        ids = ", ".join(str(t.feature) for t in top)
        return io.NodeOutput(text, chart, ids, ui={**ui.PreviewText(text).as_dict(),
                                              **ui.PreviewImage(chart, cls=cls).as_dict()})
