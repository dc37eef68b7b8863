"""The torchvision workaround for the trainer; it lives in :mod:`organism.compat`, which the plugin shares."""
from organism.compat import apply_torchvision_workaround, define_torchvision_op_schemas

__all__ = ["apply_torchvision_workaround", "define_torchvision_op_schemas"]
