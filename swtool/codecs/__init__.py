"""Quantization: block RTN with super weights held out (rtn), bit packing (pack), the on-disk layout (layout), GGML block codecs (ggml)."""
