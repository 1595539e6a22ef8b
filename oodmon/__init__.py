"""oodmon: flag model outputs that revert to the optimal constant solution (OOD inputs).

Public API; everything else is internal. Sign convention: higher OOD score = more OOD.
"""

from oodmon.detector import Detector
from oodmon.errors import FormatVersionError, NotFittedError, OodmonError, OutputShapeError
from oodmon.label_queue import LabelQueue, QueueItem, QueueWriter
from oodmon.metrics import PrometheusMetrics, serve
from oodmon.monitor import Monitor, MonitorStats
from oodmon.ocs import OCS, reward_targets
from oodmon.offline import score_table
from oodmon.scores import SCORES, distance
from oodmon.verdict import HostVerdict, Observation, Verdict
from oodmon.wrap import wrap

__version__ = "0.1.0"

__all__ = [
    "OCS",
    "SCORES",
    "Detector",
    "FormatVersionError",
    "HostVerdict",
    "LabelQueue",
    "Monitor",
    "MonitorStats",
    "NotFittedError",
    "Observation",
    "OodmonError",
    "OutputShapeError",
    "PrometheusMetrics",
    "QueueItem",
    "QueueWriter",
    "Verdict",
    "__version__",
    "distance",
    "reward_targets",
    "score_table",
    "serve",
    "wrap",
]
