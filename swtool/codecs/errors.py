"""The codecs' one error: input no block code can store (shared by ggml.py, kquants.py and rtn.py, which import it from here)."""


class NonFiniteError(ValueError):
    """The input holds NaN or infinity, which no block code stores meaningfully."""
