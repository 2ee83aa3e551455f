"""The configurations a plan chooses from: merge schedules of several shapes and tile sizes, crossed
with aligned CDCP keep ratios, at several splits of the FLOPs saving between merging and pruning."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..cdcp import ALIGN, CDCP
from ..cost import cost_model
from ..schedule import ATME, solve

# CDCP keep ratios (qk, v, mlp) tried by default, from none to strong; the fixed recipe's is the third.
PRUNE_LEVELS = (None, (0.75, 0.875, 0.875), (0.5, 0.75, 0.75), (0.5, 0.625, 0.625), (0.375, 0.5, 0.5))
# ATME FLOPs targets (relative to the pruned model) tried by default; 1.0 is no merging.
MERGE_LEVELS = (1.0, 0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)
# Schedule forms: (shape, where merging starts as a fraction of the depth, tile side).
FORMS = (("constant", 0.0, 2), ("constant", 1 / 3, 2), ("decreasing", 0.0, 2), ("constant", 0.0, 4))
RECIPE = "merge=0.7,prune=0.5/0.75/0.75"  # the fixed recipe of the README, timed as a reference


@dataclass(frozen=True)
class Candidate:
    """One configuration. ``method``: ``cait`` (ATME and/or CDCP) or ``tome`` (the ToMe baseline at
    ``merge_flops``, a reference point). ``schedule``: tokens merged away per block (empty: no
    merging), on ``block`` x ``block`` tiles, solved for ``merge_flops`` in the ``shape`` form
    starting at block ``start``; ``prune``: CDCP keep ratios ``(qk, v, mlp)`` with ``align``, or None."""

    method: str = "cait"
    schedule: tuple[int, ...] = ()
    block: int = 2
    shape: str = "constant"
    start: int = 0
    merge_flops: float = 1.0
    prune: tuple[float, float, float] | None = None
    align: int = ALIGN
    label: str = ""  # a reference point's name (e.g. "recipe")

    def __post_init__(self):
        if self.method not in ("cait", "tome"):
            raise ValueError(f"Candidate method must be 'cait' or 'tome', got {self.method!r}")

    @property
    def key(self) -> str:
        """A short unique name (cache key, table row)."""
        if self.method == "tome":
            return f"tome={self.merge_flops:g}"
        merge = f"merge={self.merge_flops:g}:{self.shape}@{self.start}/b{self.block}" if any(self.schedule) else "merge=none"
        if any(self.schedule) and self.merge_flops >= 1:  # counts given directly: they name it
            merge = f"merge=r{'.'.join(map(str, self.schedule))}/b{self.block}"
        prune = "prune=" + "/".join(f"{v:g}" for v in self.prune) if self.prune else "prune=none"
        if self.prune and self.align != ALIGN:
            prune += f"/align{self.align}"
        return f"{merge},{prune}"

    def atme(self) -> ATME | None:
        return ATME(r=self.schedule, block=self.block) if any(self.schedule) else None

    def cdcp(self) -> CDCP | None:
        return CDCP(*self.prune, align=self.align) if self.prune else None

    def build(self, model: nn.Module) -> nn.Module:
        """The compressed copy of the timm ``model`` (left untouched) this candidate describes; for a
        :class:`cait.segmentation.Segmenter`, a segmenter on the compressed backbone with a copy of its head."""
        import copy

        from ..baselines import compress_baseline
        from ..model import compress
        from ..segmentation import Segmenter

        if isinstance(model, Segmenter):
            return Segmenter(self.build(model.backbone), copy.deepcopy(model.head)).train(model.training)
        if self.method == "tome":
            return compress_baseline(model, "tome", self.merge_flops)
        return compress(model, merge=self.atme(), prune=self.cdcp())

    def to_json(self) -> dict:
        return {**asdict(self), "schedule": list(self.schedule), "prune": list(self.prune) if self.prune else None}

    @classmethod
    def from_json(cls, data: dict) -> "Candidate":
        fields = dict(data)
        fields["schedule"] = tuple(fields.get("schedule", ()))
        fields["prune"] = tuple(fields["prune"]) if fields.get("prune") else None
        return cls(**fields)


def generate(model: nn.Module, prune_levels=PRUNE_LEVELS, merge_levels=MERGE_LEVELS, forms=FORMS, align: int = ALIGN) -> list[Candidate]:
    """Every (pruning, merge target, schedule form) combination that ``model`` (a timm ViT, or a
    segmentation model's backbone) can run,
    without duplicates: merge targets below what a form can reach on the model's grid are skipped, as
    are keep ratios that ``align`` rounds to all (or none) of a narrow model's channels.
    Schedules are solved on the pruned model's cost model, as ``ATME(flops=...)`` does."""
    from ..model import compress
    from .result import trunk

    model, out = trunk(model), {}
    for prune in prune_levels:
        try:
            pruned = compress(model, prune=CDCP(*prune, align=align) if prune else None)
        except ValueError:  # a keep ratio that rounds to every channel (or none) at this align on this model's widths
            continue
        cost, depth = cost_model(pruned), len(pruned.blocks)
        for merge in merge_levels:
            if merge >= 1:
                if prune is not None:  # pruning alone; nothing merged nor pruned is the dense model, no candidate
                    out.setdefault(Candidate(prune=prune, align=align).key, Candidate(prune=prune, align=align))
                continue
            for shape, start_share, block in forms:
                start = min(depth - 1, round(start_share * depth))
                try:
                    schedule = solve(cost, merge, block, shape, start)
                except ValueError:  # this form cannot reach the target on this grid
                    continue
                c = Candidate(schedule=schedule, block=block, shape=shape, start=start, merge_flops=merge, prune=prune, align=align)
                out.setdefault(c.key, c)
    return list(out.values())


def recipe() -> Candidate:
    """The README's fixed recipe (``merge=0.7, prune=0.5/0.75/0.75``) as a candidate to solve on a model."""
    return Candidate(merge_flops=0.7, prune=(0.5, 0.75, 0.75), label="recipe")


def solved(candidate: Candidate, model: nn.Module) -> Candidate:
    """``candidate`` with its schedule solved for ``model`` (a reference point given by its targets)."""
    from dataclasses import replace

    from ..model import compress
    from .result import trunk

    if candidate.method == "tome" or candidate.merge_flops >= 1 or candidate.schedule:
        return candidate
    pruned = compress(trunk(model), prune=candidate.cdcp())
    start = candidate.start
    return replace(candidate, schedule=solve(cost_model(pruned), candidate.merge_flops, candidate.block, candidate.shape, start))
