"""The codecs' one error: input no GGML type can store (shared by ggml.py and kquants.py, which import it from here)."""


class NonFiniteError(ValueError):
    """The input holds NaN or infinity, which no GGML type stores meaningfully."""
