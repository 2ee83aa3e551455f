"""Compression plans for a measured target on this device: :func:`plan` searches merge schedules and
CDCP keep ratios, times them against the dense model in the chosen runtime and returns a :class:`Plan`
(the measured Pareto front of fidelity vs speedup and the configuration it chose)."""

from .candidates import Candidate, generate
from .result import Plan, Point
from .search import plan
from .targets import FlopsRatio, Latency, Speedup

__all__ = ["Candidate", "FlopsRatio", "Latency", "Plan", "Point", "Speedup", "generate", "plan"]
