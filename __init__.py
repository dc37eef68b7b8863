"""Diffusion SAE as a ComfyUI custom node package.

ComfyUI imports this file from ``ComfyUI/custom_nodes/diffusion_sae/`` and reads the three names below.
Keep it cheap and free of absolute imports of our own packages: ComfyUI has a top-level ``nodes``
module of its own, so ours is only ever reached relatively (``.nodes``).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
