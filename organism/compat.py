"""Make diffusers importable beside a CPU torch and PyPI's CUDA-linked torchvision.

torchvision 0.28.0 from PyPI links CUDA torch; beside the CPU torch 2.13.0 its import fails with
"operator torchvision::nms does not exist", and diffusers (through transformers) imports it.
Defining the two op schemas torchvision expects lets it import; nothing we run calls them.
A venv without torchvision, or with a matching one, needs nothing and gets nothing.

Here, in ``organism``, because the sentence encoder and the pipelines need it on both sides (plugin and
trainer); ``training.compat`` re-exports it. Only the standard library at module level: the ComfyUI test
harness loads this file by path before ComfyUI's server starts.
"""
from __future__ import annotations

import sys

_state: dict = {}


def apply_torchvision_workaround() -> bool:
    """Make ``import torchvision`` work; True when the workaround was needed."""
    if "patched" in _state:
        return _state["patched"]
    try:
        import torchvision  # noqa: F401
        patched = False
    except ImportError:
        patched = False  # not installed: diffusers and transformers then skip it
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        define_torchvision_op_schemas()
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the failed import left half-initialised submodules behind
        import torchvision  # noqa: F401
        patched = True
    _state["patched"] = patched
    return patched


def define_torchvision_op_schemas() -> None:
    """The op schemas torchvision's import checks for (also used before ComfyUI's server starts)."""
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _state["library"] = lib  # the definitions live as long as this object
