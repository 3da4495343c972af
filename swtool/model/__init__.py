"""The model: one forward that reads like pseudo-code, streamed layer by layer over a Checkpoint, and tokenizing."""
