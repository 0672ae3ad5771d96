"""Evaluation: zero-shot classification and image-text retrieval metrics."""

from .metrics import RetrievalRecall, encode_texts, zeroshot_classifier, zeroshot_logits, zeroshot_metrics

__all__ = ["RetrievalRecall", "encode_texts", "zeroshot_classifier", "zeroshot_logits", "zeroshot_metrics"]
