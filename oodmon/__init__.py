"""oodmon: flag model outputs that revert to the optimal constant solution (OOD inputs).

Public API; everything else is internal. Sign convention: higher OOD score = more OOD.
"""

from typing import TYPE_CHECKING

from oodmon._lazy_exports import lazy_exports
from oodmon.errors import FormatVersionError, NotFittedError, OodmonError, OutputShapeError

if TYPE_CHECKING:
    from oodmon.detector import Detector
    from oodmon.label_queue import LabelQueue, QueueItem, QueueWriter
    from oodmon.metrics import PrometheusMetrics, serve
    from oodmon.monitor import Monitor, MonitorStats
    from oodmon.ocs import OCS, reward_targets
    from oodmon.offline import score_table
    from oodmon.scores import SCORES, distance
    from oodmon.verdict import HostVerdict, Observation, Verdict
    from oodmon.wrapping import wrap

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

# Each name is imported on first use (most import torch): `oodmon --version` and the queue
# commands import this package without paying for torch.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Detector": "oodmon.detector",
        "HostVerdict": "oodmon.verdict",
        "LabelQueue": "oodmon.label_queue",
        "Monitor": "oodmon.monitor",
        "MonitorStats": "oodmon.monitor",
        "OCS": "oodmon.ocs",
        "Observation": "oodmon.verdict",
        "PrometheusMetrics": "oodmon.metrics",
        "QueueItem": "oodmon.label_queue",
        "QueueWriter": "oodmon.label_queue",
        "SCORES": "oodmon.scores",
        "Verdict": "oodmon.verdict",
        "distance": "oodmon.scores",
        "reward_targets": "oodmon.ocs",
        "score_table": "oodmon.offline",
        "serve": "oodmon.metrics",
        "wrap": "oodmon.wrapping",
    },
    globals(),
)
