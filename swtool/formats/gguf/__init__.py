"""GGUF files: header check, reader, writer, metadata and tokenizer translation, byte-level copy and patch."""
