"""One error type for every user-facing failure of the engine.

Callers (ComfyUI nodes, the CLI) show ``str(err)`` as is, so each message names
the file involved and says how to fix the problem, on one line.
"""


class DictionaryError(ValueError):
    """A dictionary file, configuration or input that cannot be used as given."""
