"""Evaluation: zero-shot classification and image-text retrieval."""

from .evaluate import evaluate
from .metrics import RetrievalRecall, ZeroShotAccuracy, eval_metric, retrieval_recall, zeroshot_classifier

__all__ = ["RetrievalRecall", "ZeroShotAccuracy", "eval_metric", "evaluate", "retrieval_recall", "zeroshot_classifier"]
