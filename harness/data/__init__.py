"""Text corpora with offline fallbacks (see corpora.py) and the local lm-eval tasks."""

from harness.data.corpora import DataNotFoundError, documents, evaluation_text

__all__ = ["DataNotFoundError", "documents", "evaluation_text"]
