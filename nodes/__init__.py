"""Diffusion SAE's ComfyUI nodes, collected for the plugin entry (``__init__.py`` at the repo root).

Node modules add their classes here: node id -> class, and node id -> display name.
"""
from .capture_nodes import SAECaptureActivations
from .common import register_sae_folder
from .dictionary_nodes import SAELoadDictionary, SAETrainDictionary
from .image_capture_nodes import SAECaptureFromImages
from .inspect_nodes import SAEFeatureHeatmap, SAERecordFeatures, SAETopFeatures
from .organism_nodes import NODE_CLASS_MAPPINGS as ORGANISM_NODES
from .organism_nodes import NODE_DISPLAY_NAME_MAPPINGS as ORGANISM_NAMES
from .steer_nodes import SAESteer

try:
    register_sae_folder()  # models/sae, for Load Dictionary's list
except ModuleNotFoundError:  # imported outside ComfyUI (no folder_paths): nothing to register
    pass

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "SAELoadDictionary": SAELoadDictionary,
    "SAETrainDictionary": SAETrainDictionary,
    "SAECaptureActivations": SAECaptureActivations,
    "SAECaptureFromImages": SAECaptureFromImages,
    "SAESteer": SAESteer,
    "SAERecordFeatures": SAERecordFeatures,
    "SAEFeatureHeatmap": SAEFeatureHeatmap,
    "SAETopFeatures": SAETopFeatures,
    **ORGANISM_NODES,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "SAELoadDictionary": "Load Dictionary",
    "SAETrainDictionary": "Train Dictionary",
    "SAECaptureActivations": "Capture Activations",
    "SAECaptureFromImages": "Capture Activations from Images",
    "SAESteer": "Steer",
    "SAERecordFeatures": "Record Features",
    "SAEFeatureHeatmap": "Feature Heatmap",
    "SAETopFeatures": "Top Features",
    **ORGANISM_NAMES,
}
