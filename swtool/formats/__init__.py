"""On-disk formats, one package each (hf/, gguf/, rtn/): each reads, writes and translates its own metadata.

`open.open_checkpoint` looks at a path once and returns the right reader; `base.Checkpoint` is
the one interface every reader implements. Nothing here imports the model or the analysis.
"""
