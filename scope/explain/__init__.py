"""Explanations: local auto-interpretability, scored, searchable.

``explain_features`` explains store features with any OpenAI-compatible endpoint
(``HTTPModel``) or an in-process model (``LocalModel``), scores each explanation by detection
and fuzzing on held-out examples against non-activating windows (``scope.explain.score``),
and writes them into the store's ``explanations`` side table; ``search`` ranks features by
their explanations, labels and notes.
"""

from scope.explain.models import HTTPModel, LocalModel
from scope.explain.run import METHOD, ExplainReport, Explanation, explain_features
from scope.explain.score import Score, balanced_accuracy
from scope.store.explanations import Hit
from scope.store.explanations import search_text as search

__all__ = [
    "METHOD",
    "ExplainReport",
    "Explanation",
    "HTTPModel",
    "Hit",
    "LocalModel",
    "Score",
    "balanced_accuracy",
    "explain_features",
    "search",
]
