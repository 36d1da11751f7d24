"""Kept for imports written against nanguard 0.1: the sinks now live in :mod:`nanguard.records`."""

from nanguard.records import HISTORY_COLUMNS, EventLog, HistoryLog, NullSink, Sink, write_json_atomic

__all__ = ["HISTORY_COLUMNS", "EventLog", "HistoryLog", "NullSink", "Sink", "write_json_atomic"]
