"""Diffusion SAE as a ComfyUI custom node package.

ComfyUI imports this file from ``ComfyUI/custom_nodes/diffusion_sae/`` and reads ``comfy_entrypoint``
(the V3 node API: it returns the extension listing our nodes) and ``WEB_DIRECTORY``. There is
deliberately no ``NODE_CLASS_MAPPINGS``: ComfyUI's loader takes that V1 route whenever the name
exists and would never call the entry point. Keep this file cheap and free of absolute imports of our
own packages: ComfyUI has a top-level ``nodes`` module of its own, so ours is only ever reached
relatively (``.nodes``).
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
