"""swtool-rtn: swtool's own quantized safetensors layout (codes, scales, zero points and the super weight side table)."""
