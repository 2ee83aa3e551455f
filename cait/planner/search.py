"""The planner's search: fidelity of every candidate on calibration images, then measured latency of
the promising ones by successive halving under a time budget; the result is a :class:`Plan`."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from ..benchmarks.latency import RUNTIMES, machine, prepare, time_interleaved
from ..cost import default_input_size, flops
from . import fidelity
from .candidates import Candidate, generate, recipe, solved
from .result import Plan, Point, fingerprint, name_of, trunk
from .targets import FlopsRatio, Latency, Speedup

DENSE = "dense"
FIRST_RUNG = 8  # candidates timed in the first rung (fewer where the budget is short)
FIDELITY_SHARE = 0.4  # of the budget at most for building candidates and measuring their fidelity
KEEP = 200  # timed runs the cache keeps per configuration
EFFICIENCY = 0.9  # speedup x FLOPs ratio assumed before any candidate is timed

Timer = Callable[[dict, torch.Tensor, int], dict]


def _default_timer(runners: dict, images: torch.Tensor, repeats: int) -> dict:
    return time_interleaved(runners, images, repeats, warmup=1, progress=False)


def _check(model, images, target, runtime, batch, labels, budget_s, repeats, candidates) -> None:
    from ..model import CompressedViT
    from ..support import check_supported

    if isinstance(trunk(model), CompressedViT):
        raise ValueError("plan takes the dense timm model, not a compressed one (plan from the model it came from)")
    check_supported(trunk(model))
    if not isinstance(target, (Speedup, Latency, FlopsRatio)):
        raise TypeError(f"target must be cait.planner.Speedup, Latency or FlopsRatio, got {type(target).__name__}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a whole number >= 1, got {batch!r}")
    size = tuple(default_input_size(model))
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != size or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be calibration images (B >= 1, {size[0]}, {size[1]}, {size[2]}) for this model, got {shape}")
    kind = fidelity.kind_of(model)
    shape = (len(images), *images.shape[2:]) if kind == "segmenter" else (len(images),)
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != shape):
        what = f"masks {shape} (a class per pixel)" if kind == "segmenter" else f"{len(images)} class indices (one per image)"
        raise ValueError(f"labels must be a tensor of {what}, got {getattr(labels, 'shape', labels)}")
    if isinstance(budget_s, bool) or not (isinstance(budget_s, (int, float)) and math.isfinite(budget_s) and budget_s > 0):
        raise ValueError(f"budget_s must be positive, finite seconds, got {budget_s!r}")
    if candidates is not None and (
        not isinstance(candidates, (list, tuple)) or not candidates or not all(isinstance(c, Candidate) for c in candidates)
    ):
        raise ValueError("candidates must be a non-empty list of cait.planner.Candidate (see cait.planner.generate), or None")
    seen: dict = {}
    for c in candidates or ():
        _check_candidate(c, trunk(model))
        if seen.setdefault(c.key, c) != c:
            raise ValueError(f"two candidates share the name {c.key!r} but differ: give them different merge_flops, shape or start")
    if labels is not None:
        _check_labels(labels, kind, model)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a whole number >= 1, got {repeats!r}")


def _check_candidate(c: Candidate, model: nn.Module) -> None:
    """What a candidate says, checked without building it: a merge target has its solved schedule, one
    count per block; keep ratios and counts are valid (the specs check themselves)."""
    if c.method == "cait" and c.merge_flops < 1 and not any(c.schedule):
        raise ValueError(f"candidate {c.key!r} aims at merge_flops={c.merge_flops:g} but has no schedule: solve it for the model "
                         "(cait.planner.candidates.solved, or cait.planner.generate)")  # fmt: skip
    if c.method == "cait" and any(c.schedule) and len(c.schedule) != len(model.blocks):
        raise ValueError(f"candidate {c.key!r} merges in {len(c.schedule)} blocks; the model has {len(model.blocks)}")
    if c.method == "cait":
        c.atme(), c.cdcp()


def _check_labels(labels: torch.Tensor, kind: str, model: nn.Module) -> None:
    """Class indices a classifier or a segmentation model can score (masks: or -100, ignored; not all ignored)."""
    from ..segmentation import IGNORE

    if labels.dtype.is_floating_point or labels.dtype == torch.bool or kind == "backbone":
        raise ValueError("labels must be integer class indices, for a classifier or a segmentation model (a backbone has no classes)")
    classes = model.num_classes
    valid = labels != IGNORE if kind == "segmenter" else torch.ones_like(labels, dtype=torch.bool)
    if kind == "segmenter" and not bool(valid.any()):
        raise ValueError(f"every pixel of the masks is ignored ({IGNORE}): nothing to score")
    if bool(((labels < 0) | (labels >= classes))[valid].any()):
        extra = f" or {IGNORE} (ignored)" if kind == "segmenter" else ""
        raise ValueError(f"labels must be class indices in [0, {classes}){extra} for this model")


class _Cache:
    """Measured seconds per batch, kept in a JSON file between runs, for one context (architecture,
    runtime, batch, device, dtype, threads, machine). Each write re-reads the file and replaces it
    atomically (a temporary file per process), so runs sharing the file keep each other's entries."""

    def __init__(self, path: str | None, context: dict):
        self.path, self.context = path, hashlib.sha256(json.dumps(context, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.mine = dict(self._read().get(self.context, {}))

    def _read(self) -> dict:
        if not self.path or not os.path.isfile(self.path):
            return {}
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            return {}  # an unreadable cache is rebuilt
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> list[float]:
        values = self.mine.get(key, [])
        ok = isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
        return [float(v) for v in values] if ok else []  # an entry edited into nonsense is timed again

    def put(self, entries: dict[str, list[float]]) -> None:
        """Keep ``entries`` (name -> seconds) and write the file once."""
        self.mine.update({key: list(seconds)[-KEEP:] for key, seconds in entries.items()})  # the newest runs: the file stays small
        if self.path:
            data = self._read()
            entries = data.get(self.context)
            data[self.context] = {**(entries if isinstance(entries, dict) else {}), **self.mine}
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            temporary = f"{self.path}.{os.getpid()}.tmp"
            with open(temporary, "w") as f:
                json.dump(data, f)
            os.replace(temporary, self.path)


def plan(
    model: nn.Module,
    images: torch.Tensor,
    target: Speedup | Latency | FlopsRatio,
    runtime: str = "eager",
    batch: int = 1,
    device: str | torch.device | None = None,
    labels: torch.Tensor | None = None,
    budget_s: float = 600.0,
    candidates: list[Candidate] | None = None,
    references: bool = True,
    repeats: int = 5,
    cache: str | None = None,
    timer: Timer | None = None,
    clock: Callable[[], float] = time.perf_counter,
    progress: bool = True,
) -> Plan:
    """Measure compression configurations of the timm ``model`` on this machine and choose the most
    faithful one that reaches ``target``.

    Args:
        model: a dense timm ViT that :func:`cait.compress` takes (left untouched; its dtype is used).
        images: calibration images ``(B, C, H, W)`` at the model's input size (no labels needed):
            every candidate's fidelity to ``model`` is measured on them (:mod:`cait.planner.fidelity`).
        target: :class:`Speedup` (over the dense model, same runtime, same process), :class:`Latency`
            (milliseconds per batch) or :class:`FlopsRatio`.
        runtime: how the model will run, one of :data:`cait.benchmarks.latency.RUNTIMES` (``eager``,
            ``compile`` = :func:`cait.optimize`, ``onnxruntime``, ``cuda graph``); dense and candidates
            are timed alike.
        batch: images per forward when timing (random images; speed does not depend on content).
        device: where to time (default: the model's device).
        labels: class indices ``(B,)`` for ``images``: fidelity is then top-1 accuracy.
        budget_s: seconds the whole search may take (fidelity, compilation, timing), about.
        candidates: configurations to choose from (default: :func:`cait.planner.candidates.generate`).
        references: also time the README's fixed recipe and ToMe at the chosen FLOPs ratio (for the plot).
        repeats: timed runs per candidate in the first rung; each later rung doubles them.
        cache: a JSON file that keeps measured seconds between runs on the same machine and settings.
        timer / clock: injectable for tests: ``timer(runners, images, repeats) -> {name: [seconds]}``
            (default: interleaved timing after a warm-up, :func:`cait.benchmarks.latency.time_interleaved`).

    The search: every candidate near the target's FLOPs is built and its fidelity measured (at most
    40% of the budget, nearest first to the FLOPs that reach a speed target at 90% efficiency); the
    candidates that no other beats on both FLOPs and fidelity go to successive halving: a rung times
    dense and a set of them interleaved, keeps
    the better half (those that meet the target by fidelity, the others by speed), adds untimed
    candidates predicted to meet it with higher fidelity than the best so far, and doubles the
    repeats; it stops when the budget is spent (less what the references will take) or one candidate is left.

    Returns a :class:`Plan` (``plan.chosen`` is None where nothing measured reaches the target; then
    ``plan.fastest`` names the fastest point). Raises ``ValueError`` / ``TypeError`` /
    ``NotImplementedError`` for bad arguments or an unsupported model, before any work.
    """
    from tqdm.auto import tqdm

    from ..architecture import record

    _check(model, images, target, runtime, batch, labels, budget_s, repeats, candidates)
    if cache is not None and os.path.isdir(cache):
        raise ValueError(f"cache {cache!r} is a folder: give a file (JSON) to keep the timings in")
    weight = next(model.parameters())
    device = torch.device(device) if device is not None else weight.device
    if runtime == "cuda graph" and device.type != "cuda":
        raise ValueError("runtime 'cuda graph' needs a CUDA device")
    if device.type == "cpu":
        from cait_kernels import cpu_atme

        cpu_atme.available()  # builds the C++ merge step on its first use on this machine: not the search's time
    start, timer = clock(), timer or _default_timer
    dense = copy.deepcopy(model).eval().to(device)  # the caller's model keeps its mode and device
    size = tuple(default_input_size(dense))
    timing_images = torch.randn(batch, *size, device=device, dtype=weight.dtype)
    calibration = images.to(device=device, dtype=weight.dtype)
    kind = fidelity.kind_of(dense)
    from .. import __version__

    context = dict(record(trunk(dense))["kwargs"], runtime=runtime, batch=batch, device=str(device), dtype=str(weight.dtype),
                   cait=__version__, **machine())  # fmt: skip
    if kind == "segmenter":
        context["head"] = repr(dense.head)
    store = _Cache(cache, context)
    bar = tqdm(total=round(budget_s), unit="s", desc="planning", disable=not progress, leave=False)

    def tick(note: str) -> None:
        bar.n = min(round(clock() - start), bar.total)
        bar.set_postfix_str(note)
        bar.refresh()

    # Every compiled candidate is another entry of one code object (CompressedViT.forward): lift dynamo's
    # limit of 8 per code object for the search.
    limits = torch._dynamo.config.patch(recompile_limit=4096, accumulated_recompile_limit=4096) if runtime == "compile" else nullcontext()
    with bar, limits, tempfile.TemporaryDirectory() as folder:  # the bar closes first on an error, so the message stays on screen
        exports = {"folder": folder}
        # Dense first: its latency turns a latency target into a speedup and sizes the rungs.
        prepared = clock()
        runners = {DENSE: prepare(dense, timing_images, runtime, exports)[0]}
        setup_s = clock() - prepared
        seconds: dict[str, list[float]] = {DENSE: store.get(DENSE)}
        paired: dict[str, list[float]] = {}  # per candidate: the dense seconds of the rungs it was timed in

        def entry(key: str) -> str:
            """A configuration's name in the cache: its key and a digest of everything it is (counts, kept ratios,
            tile, ...), since keys name a schedule's form and two configurations of one form can differ."""
            if key == DENSE:
                return key
            settings = {k: v for k, v in points[key].candidate.to_json().items() if k != "label"}
            return f"{key} #{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]}"

        def time_rung(keys: list[str], reps: int) -> None:
            """Bring every key (and dense, timed interleaved with them) to ``reps`` measured runs at least."""
            need = max([reps - len(seconds[k]) for k in [DENSE, *keys]])
            if need > 0:
                measured = timer({k: runners[k] for k in [DENSE, *keys]}, timing_images, need)
                for k, values in measured.items():
                    seconds[k] += list(values)
                for k in keys:  # the dense runs interleaved with this key's: its speedup is over those
                    paired[k] += list(measured[DENSE])
                store.put({**{entry(k): seconds[k] for k in measured}, **{f"{entry(k)} | dense": paired[k] for k in keys}})

        time_rung([], repeats)
        dense_latency = statistics.median(seconds[DENSE])
        needed = target.needed_speedup(dense_latency)
        tick("dense timed")

        # Fidelity of the candidates nearest the target, within FIDELITY_SHARE of the budget.
        reference_out = fidelity.outputs(_uncompressed(dense), calibration, kind)
        pool = candidates if candidates is not None else generate(dense)
        dense_flops = flops(dense)
        points: dict[str, Point] = {}
        efficiency = 1.0 if isinstance(target, FlopsRatio) else EFFICIENCY  # a FLOPs target is met by FLOPs alone
        ordered = sorted(pool, key=lambda c: abs(math.log(max(1e-6, _predicted_flops(c, dense)) * needed / efficiency)))
        evaluations = [0.0]  # seconds per candidate's fidelity (build, forward on the calibration images)
        for c in ordered:
            if points and clock() - start > FIDELITY_SHARE * budget_s:
                break
            began = clock()
            points[c.key] = _evaluate(c, dense, calibration, reference_out, dense_flops, labels)
            evaluations.append(clock() - began)
            tick(f"fidelity {len(points)}/{len(ordered)}")

        # Successive halving on the points no other beats on both FLOPs and fidelity.
        frontier = _undominated(list(points.values()))
        setups = [max(setup_s, 1e-3)]  # seconds to get a model ready (compile, export): dense's, then every candidate's

        def rung_cost(models: int, reps: int) -> float:
            """Seconds to time ``models`` candidates and dense at ``reps`` runs after a warm-up (candidates at dense's pace at most)."""
            return (models + 1) * (reps + 1) * dense_latency_now()

        def speedup(key: str) -> float:
            return statistics.median(paired[key] or seconds[DENSE]) / statistics.median(seconds[key])

        def dense_latency_now() -> float:
            return statistics.median(seconds[DENSE])

        def meets(p: Point) -> bool:  # a FLOPs target needs no timing
            if isinstance(target, FlopsRatio):
                return p.flops_ratio <= target.ratio
            return p.speedup is not None and target.met(p.speedup, p.latency_s, p.flops_ratio)

        def promising(p: Point, efficiency: float) -> bool:
            return meets(p) if isinstance(target, FlopsRatio) else efficiency / p.flops_ratio >= 0.9 * needed

        def update(keys) -> None:
            for k in keys:
                p = points[k]
                p.latency_s, p.speedup, p.repeats = statistics.median(seconds[k]), speedup(k), len(seconds[k])
                p.speedup_iqr = _spread(paired[k], seconds[k])

        def reference_cost(reps: int) -> float:
            return 2 * (max(setups) + max(evaluations)) + rung_cost(2, reps)

        survivors: list[str] = []
        reps, width = repeats, FIRST_RUNG
        while True:
            left = budget_s - (clock() - start) - (reference_cost(repeats) if references else 0.0)  # the references' share kept
            timed = [p for p in points.values() if p.speedup is not None]
            efficiency = statistics.median([p.speedup * p.flops_ratio for p in timed]) if timed else EFFICIENCY
            best = max((p.rank() for p in timed if meets(p)), default=None)
            fresh = [
                p for p in sorted(frontier, key=lambda p: p.rank(), reverse=True)
                if p.speedup is None and p.key not in seconds and promising(p, efficiency)
                and (best is None or p.rank() > best)
            ]  # fmt: skip
            if best is None and not any(meets(p) for p in timed):  # also look for the fastest point
                fastest = min((p for p in frontier if p.key not in seconds), key=lambda p: p.flops_ratio, default=None)
                if fastest is not None:  # first, so the rung's width never cuts it
                    fresh = [fastest, *(p for p in fresh if p is not fastest)]
            count = 0  # new candidates the rest of the budget affords: each one's setup (the slowest seen) and its timing
            while count < min(width, len(fresh)) and (count + 1) * max(setups) + rung_cost(len(survivors) + count + 1, reps) <= left:
                count += 1
            new = fresh[:count]
            if not new and (len(survivors) <= 1 or left < rung_cost(len(survivors), reps)):
                break
            for i, p in enumerate(new):
                reserve = reference_cost(repeats) if references else 0.0  # grows as slower setups are seen
                if i and budget_s - (clock() - start) - reserve < max(setups) + rung_cost(len(survivors) + i + 1, reps):
                    break  # setups took longer than expected: time the ones ready
                ready = clock()
                try:
                    runners[p.key] = prepare(p.candidate.build(dense), timing_images, runtime, exports)[0]
                except Exception as error:  # a runtime that cannot take this configuration: leave it out, say so
                    print(f"{p.key} [{runtime}] not timed: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr, flush=True)
                    frontier.remove(p)
                    continue
                setups.append(clock() - ready)
                seconds[p.key], paired[p.key] = store.get(entry(p.key)), store.get(f"{entry(p.key)} | dense")
            rung = survivors + [p.key for p in new if p.key in runners]
            if not rung:
                break
            time_rung(rung, reps)
            update(rung)
            tick(f"rung of {len(rung)} at {reps} repeats")
            ranked = sorted(
                rung, key=lambda k: (meets(points[k]), points[k].rank() if meets(points[k]) else (points[k].speedup, 0)), reverse=True
            )
            survivors = ranked[: max(1, math.ceil(len(ranked) / 2))]
            for k in ranked[len(survivors) :]:
                runners.pop(k, None)
            reps, width = reps * 2, max(1, width // 2)
        update([k for k in points if k in seconds])

        fastest = max((p for p in points.values() if p.speedup is not None), key=lambda p: p.speedup, default=None)
        chosen = _choose(points.values(), meets)

        # The references: as many runs as the most-timed point, or as many as the rest of the budget affords.
        reference_keys, runs = [], max(repeats, max((p.repeats for p in points.values() if p.key in seconds), default=repeats))
        while runs > repeats and reference_cost(runs) > budget_s - (clock() - start):
            runs = max(repeats, runs // 2)
        if references:  # their share was kept out of the search: time them even where its estimate ran a little short
            at = chosen or fastest
            refs = [solved(recipe(), dense)] + (
                [Candidate(method="tome", merge_flops=round(at.flops_ratio, 3), label="ToMe")] if at and at.flops_ratio < 0.995 else []
            )  # ToMe merging nothing is no reference
            for c in refs:
                try:
                    p = points.get(c.key) or _evaluate(c, dense, calibration, reference_out, dense_flops, labels)
                    p.candidate = dataclasses.replace(p.candidate, label=c.label)  # a generated point may be the recipe
                    runners[c.key] = prepare(c.build(dense), timing_images, runtime, exports)[0]
                except Exception as error:  # ToMe out of reach, or a runtime that cannot take it: the plot has one reference less
                    print(f"reference {c.label} left out: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr, flush=True)
                    continue
                points[c.key] = p
                seconds.setdefault(c.key, store.get(entry(c.key)))
                paired.setdefault(c.key, store.get(f"{entry(c.key)} | dense"))
                reference_keys.append(c.key)
            time_rung(reference_keys, runs)
            update(reference_keys)
    return Plan(
        target=target, runtime=runtime, batch=batch, device=str(device), dtype=str(weight.dtype).removeprefix("torch."),
        model=name_of(model), input_size=size, machine=machine(), dense_latency_s=dense_latency_now(), dense_gflops=dense_flops / 1e9,
        points=list(points.values()), chosen=chosen.key if chosen else None, fastest=fastest.key if fastest else None,
        references=reference_keys, spent_s=clock() - start, budget_s=float(budget_s), considered=len(pool), architecture=fingerprint(dense),
    )  # fmt: skip


def _choose(points, meets) -> Point | None:
    """The most faithful CAIT point that meets the target (ties: the faster); never one that merges and
    prunes nothing (the dense model itself, which a plan is not for)."""
    compressing = [p for p in points if p.candidate.method == "cait" and (any(p.candidate.schedule) or p.candidate.prune) and meets(p)]
    return max(compressing, key=lambda p: (p.rank(), p.speedup or 0), default=None)


def _spread(dense: list[float], own: list[float]) -> tuple[float, float] | None:
    """First and third quartiles of the per-run speedups: each of the newest runs of a configuration
    against the dense run interleaved with it (None under 2 pairs)."""
    n = min(len(dense), len(own))
    if n < 2:
        return None
    quartiles = statistics.quantiles([d / o for d, o in zip(dense[-n:], own[-n:])], n=4)
    return quartiles[0], quartiles[2]


def _uncompressed(model: nn.Module) -> nn.Module:
    from ..model import compress

    return compress(model) if fidelity.kind_of(model) == "backbone" else model  # forward_dense comes with the compressed model


def _predicted_flops(candidate: Candidate, model: nn.Module) -> float:
    """The FLOPs ratio a candidate aims at (its merge target times what its pruning keeps, roughly)."""
    if candidate.method == "tome":
        return candidate.merge_flops
    kept = 1.0
    if candidate.prune:
        qk, v, mlp = candidate.prune
        kept = (2 * qk + 2 * v + 8 * mlp) / 12  # a ViT block's linear FLOPs: qk 2/12, v and proj 2/12, MLP 8/12
    return candidate.merge_flops * kept


def _evaluate(c: Candidate, dense: nn.Module, images, reference_out, dense_flops: int, labels) -> Point:
    fast = c.build(dense)
    kind = fidelity.kind_of(dense)
    out = fidelity.outputs(fast, images, kind)
    count = flops(fast)
    classes = dense.num_classes if kind == "segmenter" else 0
    return Point(c, count / dense_flops, count / 1e9, fidelity.measure(reference_out, out, kind, labels, classes))


def _undominated(points: list[Point]) -> list[Point]:
    """The points no other point beats on both FLOPs (fewer) and fidelity (higher), and the next layer
    (timing decides among configurations of similar FLOPs, which FLOPs alone cannot)."""

    def layer(ps):
        return [
            p
            for p in ps
            if not any(
                q.flops_ratio <= p.flops_ratio and q.rank() >= p.rank() and (q.flops_ratio, q.rank()) != (p.flops_ratio, p.rank())
                for q in ps
            )
        ]

    first = layer(points)
    rest = [p for p in points if p not in first]
    return first + layer(rest)
