"""The exception users see.

Every error raised on purpose by Erasekit is an :class:`ErasekitError` whose message is one
sentence that names the file or value at fault, says what was expected, and (where it can)
what to do. The ComfyUI nodes, the A1111 extension and the trainer show that sentence as is.
"""


class ErasekitError(Exception):
    """A user-facing error: ``str(err)`` is the whole message, no stack trace needed."""


class ModelFileError(ErasekitError):
    """A weights file is missing, unreadable, corrupt, or not a format we load."""


class ArchitectureError(ErasekitError):
    """A model, LoRA or embedding does not match the architecture it is used with."""
