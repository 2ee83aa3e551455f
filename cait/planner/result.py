"""A plan: every measured configuration, the measured Pareto front and the chosen one, as JSON."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from torch import nn

from .candidates import Candidate
from .targets import FlopsRatio, Target, target_from_json, target_to_json

FORMAT = 1  # version of the plan file


def trunk(model: nn.Module) -> nn.Module:
    """The timm ViT a plan compresses: a segmentation model's backbone, else the model itself."""
    from ..segmentation import Segmenter

    return model.backbone if isinstance(model, Segmenter) else model


def name_of(model: nn.Module) -> str:
    """What a plan calls the model: timm's architecture name (a segmentation model: ``Segmenter(<name>)``)."""
    inner = trunk(model)
    name = (getattr(inner, "pretrained_cfg", None) or {}).get("architecture") or type(inner).__name__
    return name if inner is model else f"{type(model).__name__}({name})"


def fingerprint(model: nn.Module) -> str:
    """A short hash of a timm model's architecture settings (depth, widths, heads, ...; not its
    classifier size or input size, which a plan checks apart); a segmentation model's also covers
    its decode head."""
    import hashlib

    from ..architecture import record

    settings = {k: v for k, v in record(trunk(model))["kwargs"].items() if k not in ("num_classes", "img_size")}
    if trunk(model) is not model:
        settings["head"] = repr(model.head)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Point:
    """A candidate and what was measured of it. ``latency_s``: median seconds per batch over
    ``repeats`` timed runs (None: not timed); ``speedup``: the dense model's median latency over this
    one's, both timed interleaved in the same runs; ``speedup_iqr``: the first and third quartiles of
    the per-run speedups (each timed run of this configuration against the dense run next to it: the
    timing noise); ``fidelity``: see :func:`cait.planner.fidelity.measure`."""

    candidate: Candidate
    flops_ratio: float
    gflops: float  # per image, multiply-add = 2
    fidelity: dict
    latency_s: float | None = None
    speedup: float | None = None
    repeats: int = 0
    speedup_iqr: tuple[float, float] | None = None

    @property
    def key(self) -> str:
        return self.candidate.key

    def rank(self) -> tuple[float, float]:
        """Higher is more faithful: the fidelity score, then the lower KL."""
        return self.fidelity["score"], -self.fidelity.get("kl", 0.0)

    def to_json(self) -> dict:
        iqr = list(self.speedup_iqr) if self.speedup_iqr else None
        return {**vars(self), "candidate": self.candidate.to_json(), "speedup_iqr": iqr}

    @classmethod
    def from_json(cls, data: dict) -> "Point":
        iqr = data.get("speedup_iqr")
        return cls(**{**data, "candidate": Candidate.from_json(data["candidate"]), "speedup_iqr": tuple(iqr) if iqr else None})


def pareto_front(points: list[Point]) -> list[Point]:
    """The timed points no other timed point beats on both speedup and fidelity, fastest first."""
    timed = sorted((p for p in points if p.speedup is not None), key=lambda p: (-p.speedup, [-v for v in p.rank()]))
    front, best = [], None
    for p in timed:
        if best is None or p.rank() > best:
            front.append(p)
            best = p.rank()
    return front


@dataclass
class Plan:
    """What :func:`cait.plan` measured and chose. ``chosen``: the key of the most faithful timed point
    that meets ``target`` (None where none does: ``reachable`` is False and ``fastest`` names the
    fastest point measured). ``dense_latency_s``: the dense model's median seconds per batch."""

    target: Target
    runtime: str
    batch: int
    device: str
    dtype: str
    model: str  # timm name or class (name_of)
    input_size: tuple[int, int, int]
    machine: dict
    dense_latency_s: float
    dense_gflops: float
    points: list[Point]
    chosen: str | None
    fastest: str | None
    references: list[str] = field(default_factory=list)  # keys of the reference points (fixed recipe, ToMe)
    spent_s: float = 0.0
    budget_s: float = 0.0
    considered: int = 0  # candidates the search started from (``points`` holds those whose fidelity it measured)
    architecture: str = ""  # fingerprint() of the model measured

    @property
    def reachable(self) -> bool:
        return self.chosen is not None

    def point(self, key: str) -> Point:
        """The point named ``key``; ``KeyError`` naming it when the plan has none."""
        found = next((p for p in self.points if p.key == key), None)
        if found is None:
            raise KeyError(f"this plan has no point {key!r}")
        return found

    @property
    def front(self) -> list[Point]:
        return pareto_front([p for p in self.points if p.candidate.method == "cait"])

    @property
    def candidate(self) -> Candidate:
        """The chosen configuration; ``ValueError`` where the target was out of reach."""
        if self.chosen is None:
            raise ValueError(f"this plan found nothing that reaches {self.target}: {self.summary()}")
        return self.point(self.chosen).candidate

    def candidate_at(self, point: str | None = None) -> Candidate:
        """The configuration of the measured CAIT ``point`` (a key of :attr:`points`, e.g. another
        point of :attr:`front`), or the chosen one when None. ``ValueError`` for a key the plan does
        not hold (the front's keys listed), a ToMe reference, or (None) an out-of-reach target."""
        if point is None:
            return self.candidate
        try:
            found = self.point(point)
        except KeyError:
            keys = ", ".join(p.key for p in self.front) or "none"
            raise ValueError(f"this plan has no point {point!r} (its Pareto front: {keys})") from None
        if found.candidate.method != "cait":
            raise ValueError(f"{point!r} is the plan's ToMe reference, not a CAIT configuration")
        return found.candidate

    def check(self, model: nn.Module) -> None:
        """``ValueError`` unless the timm ``model`` is the plan's architecture at its input size."""
        from ..cost import default_input_size

        size = tuple(default_input_size(model))
        if size != tuple(self.input_size):
            raise ValueError(f"this plan was made for {self.model} on {tuple(self.input_size)} inputs; the model takes {size}")
        name = name_of(model)
        if name != self.model:
            raise ValueError(f"this plan was made for {self.model}, not {name}")
        if self.architecture and fingerprint(model) != self.architecture:
            raise ValueError(f"this plan was made for a {self.model} built with other settings (depth, widths, heads, ...) than this one")

    def compress(self, model: nn.Module, point: str | None = None) -> nn.Module:
        """The chosen configuration (or the measured ``point``, see :meth:`candidate_at`) applied to
        the timm ``model`` (the plan's architecture and input size, else ``ValueError``): the same
        model the plan measured, given the same weights."""
        candidate = self.candidate_at(point)
        self.check(model)
        fast = candidate.build(model)
        trunk(fast).origin = self.origin(point=point)
        return fast

    def origin(self, path: str | os.PathLike | None = None, point: str | None = None) -> dict:
        """What a model built from this plan (its choice, or ``point``) records of it (:attr:`cait.CompressedViT.origin`)."""
        where = self.machine.get("gpu") or self.machine.get("cpu")
        made = {"plan": os.path.abspath(path)} if path else {}
        made |= {"target": str(self.target), "measured": f"{self.runtime}, batch {self.batch}, {where}"}
        if point is None:
            return made | {"chosen": self.summary()}
        return made | {"point (not the plan's choice)": self.describe(self.point(point))}

    def describe(self, p: Point) -> str:
        """One line: a point's configuration and what was measured of it."""
        if p.speedup is None:
            return f"{p.key}: not timed, {p.flops_ratio:.3f} of the FLOPs, fidelity {p.fidelity['score']:.4f}"
        return (f"{p.key}: {p.speedup:.2f}x ({1e3 * p.latency_s:.2f} ms per batch of {self.batch}), "
                f"{p.flops_ratio:.3f} of the FLOPs, fidelity {p.fidelity['score']:.4f}")  # fmt: skip

    def summary(self) -> str:
        """One line: what was chosen (or the fastest point where the target is out of reach)."""
        if self.chosen is not None:
            return self.describe(self.point(self.chosen))
        if self.fastest is None:
            return "no configuration was timed (raise the budget)"
        p = self.point(self.fastest)
        return (f"out of reach: the fastest point measured, {p.key}, runs {p.speedup:.2f}x "
                f"({1e3 * p.latency_s:.2f} ms per batch of {self.batch}) at {p.flops_ratio:.3f} of the FLOPs")  # fmt: skip

    def table(self) -> str:
        """Markdown: the timed points, fastest first (front points marked)."""
        front = {p.key for p in self.front}
        lines = ["| configuration | FLOPs ratio | speedup | IQR | ms per batch | fidelity | KL | repeats | |", "|---" * 9 + "|"]
        for p in sorted((p for p in self.points if p.speedup is not None), key=lambda p: -p.speedup):
            mark = "chosen" if p.key == self.chosen else "reference" if p.key in self.references else "front" if p.key in front else ""
            kl = f"{p.fidelity['kl']:.4f}" if "kl" in p.fidelity else "-"
            iqr = f"{p.speedup_iqr[0]:.2f}-{p.speedup_iqr[1]:.2f}" if p.speedup_iqr else "-"
            lines.append(f"| {p.key} | {p.flops_ratio:.3f} | {p.speedup:.2f}x | {iqr} | {1e3 * p.latency_s:.2f} | "
                         f"{p.fidelity['score']:.4f} | {kl} | {p.repeats} | {mark} |")  # fmt: skip
        return "\n".join(lines)

    def to_json(self) -> dict:
        data = {k: v for k, v in vars(self).items() if k not in ("target", "points")}
        data.update(format=FORMAT, target=target_to_json(self.target), points=[p.to_json() for p in self.points])
        data["input_size"] = list(self.input_size)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a cait plan of format {FORMAT} (got format {data.get('format')!r})")
        fields = {k: v for k, v in data.items() if k != "format"}
        fields.update(target=target_from_json(data["target"]), points=[Point.from_json(p) for p in data["points"]])
        fields["input_size"] = tuple(data["input_size"])
        return cls(**fields)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """A plan written by :meth:`save`; ``ValueError`` for a file that is not one."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a cait plan (not JSON: {error})") from None
        except IsADirectoryError:
            raise ValueError(f"{path} is a folder, not a cait plan file") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a cait plan")
        try:
            plan = cls.from_json(data)
            plan.validate()
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise ValueError(f"{path} is not a complete cait plan ({type(error).__name__}: {error})") from None
        return plan

    def validate(self) -> None:
        """``ValueError`` (or the ``KeyError``/``TypeError`` of a missing field) unless the plan's parts agree:
        three input sizes, every point's fidelity has a score, the chosen, fastest and reference keys
        name its points."""
        if len(self.input_size) != 3 or not all(isinstance(v, int) and v > 0 for v in self.input_size):
            raise ValueError(f"input_size must be (C, H, W), got {self.input_size}")
        keys = {p.key for p in self.points}
        for p in self.points:
            if not isinstance(p.fidelity.get("score"), (int, float)):
                raise ValueError(f"point {p.key!r} has no fidelity score")
        for name, key in (("chosen", self.chosen), ("fastest", self.fastest), *(("reference", k) for k in self.references)):
            if key is not None and key not in keys:
                raise ValueError(f"its {name} configuration {key!r} is none of its points")

    def plot(self, path: str) -> None:
        """A PNG at ``path``: fidelity against measured speedup; every timed point, the front as a line,
        the chosen point as a star, the reference points (fixed recipe, ToMe) labelled, the target as a line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, ax = plt.subplots(figsize=(7, 4.6))
        timed = [p for p in self.points if p.speedup is not None and p.candidate.method == "cait"]
        ax.scatter([p.speedup for p in timed], [p.fidelity["score"] for p in timed], s=14, color="0.6", label="measured")
        front = self.front
        ax.plot([p.speedup for p in front], [p.fidelity["score"] for p in front], "-o", color="C3", markersize=4, label="Pareto front")
        for key in self.references:
            p = self.point(key)
            if p.speedup is not None:
                ax.scatter([p.speedup], [p.fidelity["score"]], marker="s", s=40, color="C0")
                where = (p.speedup, p.fidelity["score"])
                ax.annotate(p.candidate.label or key, where, fontsize=7, xytext=(4, -10), textcoords="offset points")
        if self.chosen is not None:
            p = self.point(self.chosen)
            ax.scatter([p.speedup], [p.fidelity["score"]], marker="*", s=200, color="C3", zorder=3, label=f"chosen: {p.key}")
        if not isinstance(self.target, FlopsRatio):  # a FLOPs target is no speed
            ax.axvline(self.target.needed_speedup(self.dense_latency_s), color="black", linestyle=":", label=f"target: {self.target}")
        sample = (timed or self.points or [None])[0]
        metric = _metric_name(sample.fidelity if sample else {}, self.model)
        ax.set(xlabel=f"speedup over dense ({self.runtime}, batch {self.batch}, {self.device})", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{self.model}: {self.machine.get('gpu') or self.machine.get('cpu', '')}", fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


def _metric_name(fidelity: dict, model: str) -> str:
    """What a plan's fidelity score is, in words (the plot's axis)."""
    if "cosine" in fidelity:
        return "cosine of grid features with dense"
    if "miou" in fidelity:
        return "mIoU (given masks)"
    if "top1" in fidelity:
        return "top-1 accuracy (given labels)"
    return "pixel agreement with dense" if model.startswith("Segmenter(") else "top-1 agreement with dense"
