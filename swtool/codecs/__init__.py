"""Codecs: tensors in, bytes out. Block RTN with super weights held out (rtn), bit packing (pack), GGML block codecs (ggml) and in-place block edits (ggml_edit). Imports nothing above it."""
