"""Diffusion SAE's ComfyUI nodes, in ComfyUI's V3 schema, collected for the plugin entry (``__init__.py`` at
the repo root): :func:`comfy_entrypoint` returns the :class:`ComfyExtension` that lists them."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import organism_nodes
from .capture_nodes import SAECaptureActivations
from .concept_nodes import SAESteerByConcept, SAESteerSweep
from .common import register_sae_folder
from .dictionary_nodes import SAELoadDictionary, SAETrainDictionary
from .image_capture_nodes import SAECaptureFromImages
from .index_nodes import SAEBuildFeatureIndex
from .inspect_nodes import SAEFeatureHeatmap, SAERecordFeatures, SAETopFeatures
from .label_nodes import SAELabelFeatures
from .probe_nodes import SAEDiffCProbe
from .routes import register_routes
from .steer_nodes import SAESteer

NODES: list[type[io.ComfyNode]] = [
    SAELoadDictionary, SAETrainDictionary, SAECaptureActivations, SAECaptureFromImages, SAESteer,
    SAESteerByConcept, SAESteerSweep, SAERecordFeatures, SAEFeatureHeatmap, SAETopFeatures, SAEBuildFeatureIndex,
    SAELabelFeatures, SAEDiffCProbe, *organism_nodes.NODES,
]


class DiffusionSAE(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> DiffusionSAE:
    """ComfyUI's V3 entry: registers ``models/sae`` (Load Dictionary lists it), ``models/sae_organisms`` and the
    feature browser's routes
    (when ComfyUI runs its server), and returns the extension."""
    register_sae_folder()
    organism_nodes.register_organism_folder()
    register_routes()
    return DiffusionSAE()
