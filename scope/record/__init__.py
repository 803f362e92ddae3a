"""Record every feature of many SAEs over a corpus in one pass into a store."""

from scope.record.runner import RecordSettings, RecordSummary, record
from scope.record.state import FeatureState

__all__ = ["FeatureState", "RecordSettings", "RecordSummary", "record"]
