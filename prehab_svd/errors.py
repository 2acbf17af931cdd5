"""User-facing errors.

Everything a user can get wrong (bad keep_ratio, a missing model path, too little calibration data,
NaN in activations, ...) raises :class:`PrehabError` with a message that says what was wrong and what
to do. The CLI turns it into a one-line message and exit status 2; library callers can catch it.
"""


class PrehabError(ValueError):
    """A problem with the caller's input, explained in the message."""


class NonFiniteActivationError(PrehabError, FloatingPointError):
    """NaN or Inf reached a layer's input during calibration; the message names the layer."""
