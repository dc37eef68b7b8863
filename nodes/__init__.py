"""Diffusion SAE's ComfyUI nodes, collected for the plugin entry (``__init__.py`` at the repo root).

Node modules add their classes here: node id -> class, and node id -> display name.
"""
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
