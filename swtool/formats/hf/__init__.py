"""Hugging Face checkpoints: the safetensors reader, the sharded writer, and HF export (config and tokenizer files)."""
