"""Exceptions with messages a user can act on. Torch-free."""


class SegAssistError(Exception):
    """Base class of every error SegAssist raises on purpose."""

    code = "segassist_error"


class PromptError(SegAssistError, ValueError):
    """A prompt is malformed, degenerate or outside the image."""

    code = "invalid_prompt"


class ImageError(SegAssistError, ValueError):
    """An image cannot be segmented: wrong dimensionality, NaN, empty, unreadable."""

    code = "invalid_image"


class ModelError(SegAssistError, RuntimeError):
    """A checkpoint cannot be loaded or does not match the network."""

    code = "model_error"


class DeviceError(ModelError):
    """The device asked for does not exist or torch cannot use it here."""


class SessionError(SegAssistError, RuntimeError):
    """An operation does not fit the session's state (nothing to undo, session closed)."""

    code = "session_state"
