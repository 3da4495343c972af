"""swtool: find, protect and study the super weights of LLM checkpoints, streamed."""

__version__ = "0.1.0"
