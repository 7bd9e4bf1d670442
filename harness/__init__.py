"""harness: structured pruning of LLMs without retraining, benchmarked under one protocol."""

__version__ = "0.1.0"
