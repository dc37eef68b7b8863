"""The organism's one error type, for a folder, file or input it cannot use.

A ValueError, as every ``sae_core.SAEError`` is: ComfyUI and the CLI show ``str(err)`` as is. Defined
here because this package must not import ``sae_core`` (see the package docstring).
"""


class OrganismError(ValueError):
    """An organism folder, weight file, config or input that cannot be used as given."""
