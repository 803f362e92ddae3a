"""Record every feature of many SAEs over a corpus in one pass into a store."""

from scope.interrupt import stop_on_signals
from scope.record.loop import RecordProgress
from scope.record.runner import record
from scope.record.session import RecordingSession
from scope.record.settings import RecordSettings, RecordSummary
from scope.record.spec import RunSpec
from scope.record.state import FeatureState

__all__ = [
    "FeatureState",
    "RecordProgress",
    "RecordSettings",
    "RecordSummary",
    "RecordingSession",
    "RunSpec",
    "record",
    "stop_on_signals",
]
