"""The model organism: small Flux- and U-Net-architecture text-to-image models trained on real images
from PyPI packages, so every offline test and the demo run on a model that learned something.

    from training.runner import load_runner
    runner = load_runner("organism-flux")          # or "organism-unet"
    images = runner.generate(["a handwritten seven"], seeds=[0])   # (1, 1, 32, 32) in [0, 1]

``python -m training organism`` rebuilds the committed weights (``weights/``); see BENCHMARKS.md.
"""
