"""Evaluation: perplexity (our own protocol code) and efficiency of the pruned model."""
