"""User-facing errors, one type per kind of mistake.

Callers (ComfyUI nodes, the CLI) show ``str(err)`` as is, and ComfyUI shows the type's name beside it,
so each name says what went wrong and each message names the file, site or option involved and how to
fix it, on one line. Every type is a :class:`SAEError` (a ``ValueError``: the input was wrong, not the
program), so a front end can catch them all at once.

ComfyUI names an error by its class's module and name; inside the plugin that module path would be the
plugin's folder on disk plus ``.sae_core.errors``, so each type reports its module as ``diffusion_sae``
and the user reads ``diffusion_sae.SiteError``. (Pickling these errors by reference across processes
is therefore not supported; nothing here does it.)
"""


class SAEError(ValueError):
    """Anything a user can fix: a file, setting or input that cannot be used as given."""


class DictionaryError(SAEError):
    """A dictionary file, header or weights that cannot be used, or a dictionary that does not fit its use
    (another width, a feature id out of range)."""


class SiteError(SAEError):
    """A site that this model does not have, a model family with no sites here, or a site function that
    returned another shape than it was given."""


class ScheduleError(SAEError):
    """A timestep window or sigma range that is malformed, or that the sampler's context cannot answer (or a
    context source that reports values it has no name for)."""


class SteerError(SAEError):
    """Steering settings that cannot be applied: mode, units, strengths, masks, rows."""


class ShardError(SAEError):
    """Activation shards, manifests or buffers that are missing, damaged or inconsistent."""


class ConfigError(SAEError):
    """A training, capture or command-line option (or config file) with a bad value."""


class InputError(SAEError):
    """Prompts, images, folders or model names that cannot be read or used."""


class WriteError(SAEError):
    """A file that cannot be written (disk full, no permission); the previous version, if any, is intact."""


class TrainingError(SAEError):
    """A training run that cannot go on (no usable batch, no finite activations)."""


PUBLIC_MODULE = "diffusion_sae"


def _name_publicly() -> None:
    for error in (SAEError, *SAEError.__subclasses__()):
        error.__module__ = PUBLIC_MODULE


_name_publicly()
