"""The model organism: small Flux- and U-Net-architecture text-to-image models trained on real images
from PyPI packages, so every offline test and the demo run on a model that learned something.

    from training.runner import load_runner
    runner = load_runner("organism-flux")          # or "organism-unet"
    images = runner.generate(["a handwritten seven"], seeds=[0])   # (1, 1, 32, 32) in [0, 1]

A package of its own so that both sides can use it: the headless trainer imports it as ``organism``,
the ComfyUI plugin relatively (``..organism``). Hence only relative imports inside, nothing from
``sae_core`` or ``training``, and no diffusers at import time except in :mod:`.pipelines`.
``python -m training organism`` rebuilds the committed weights (``weights/``); see BENCHMARKS.md.
"""
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
"""The committed organisms: ``WEIGHTS / "flux"``, ``WEIGHTS / "unet"`` and the classifier."""
