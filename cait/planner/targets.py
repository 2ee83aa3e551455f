"""What a plan must reach: a speedup over the dense model, a latency, or a FLOPs ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Speedup:
    """At least ``times`` the dense model's images/s, both measured in the same process and runtime."""

    times: float

    def __post_init__(self):
        if isinstance(self.times, bool) or not isinstance(self.times, (int, float)) or not math.isfinite(self.times) or self.times <= 0:
            raise ValueError(f"Speedup takes a positive factor, e.g. Speedup(1.9), got {self.times!r}")

    def met(self, speedup: float, latency_s: float, flops_ratio: float) -> bool:
        return speedup >= self.times

    def needed_speedup(self, dense_latency_s: float) -> float:
        return float(self.times)

    def __str__(self) -> str:
        return f"{self.times:g}x the dense model"


@dataclass(frozen=True)
class Latency:
    """At most ``ms`` milliseconds per batch (one forward of the planned batch size)."""

    ms: float

    def __post_init__(self):
        if isinstance(self.ms, bool) or not isinstance(self.ms, (int, float)) or not math.isfinite(self.ms) or self.ms <= 0:
            raise ValueError(f"Latency takes positive milliseconds per batch, e.g. Latency(ms=12), got {self.ms!r}")

    def met(self, speedup: float, latency_s: float, flops_ratio: float) -> bool:
        return latency_s * 1e3 <= self.ms

    def needed_speedup(self, dense_latency_s: float) -> float:
        return dense_latency_s * 1e3 / self.ms

    def __str__(self) -> str:
        return f"{self.ms:g} ms per batch"


@dataclass(frozen=True)
class FlopsRatio:
    """At most ``ratio`` of the dense model's FLOPs (no timing decides it; the plan still times the front)."""

    ratio: float

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"FlopsRatio takes a ratio in (0, 1], e.g. FlopsRatio(0.5), got {self.ratio!r}")

    def met(self, speedup: float, latency_s: float, flops_ratio: float) -> bool:
        return flops_ratio <= self.ratio

    def needed_speedup(self, dense_latency_s: float) -> float:
        return 1 / self.ratio

    def __str__(self) -> str:
        return f"{self.ratio:g} of the dense FLOPs"


Target = Speedup | Latency | FlopsRatio


def target_to_json(target: Target) -> dict:
    return {type(target).__name__: next(iter(vars(target).values()))}


def target_from_json(data: dict) -> Target:
    kinds = {"Speedup": Speedup, "Latency": Latency, "FlopsRatio": FlopsRatio}
    if len(data) != 1 or next(iter(data)) not in kinds:
        raise ValueError(f"a plan's target is one of {sorted(kinds)}, got {data!r}")
    ((kind, value),) = data.items()
    return kinds[kind](value)
