"""Offline scoring: verdicts for tables of logged model outputs.

Tables are Parquet, JSON Lines, .npy or .pt, streamed in flat memory, in one process or on
Ray Data. See :func:`score_table`.

pyarrow (``pip install oodmon[offline]``) and Ray (``oodmon[ray]``) are imported only when a
Parquet file, a JSON Lines-to-Parquet run or the Ray engine needs them.
"""

from oodmon.offline.rows import INVALID_REASONS, UnreadableInputError
from oodmon.offline.score import score_table
from oodmon.offline.summary import ScoreSummary

__all__ = ["INVALID_REASONS", "ScoreSummary", "UnreadableInputError", "score_table"]
