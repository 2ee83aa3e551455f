"""The planner's benchmark (``cait bench --plan``): what :func:`cait.plan` chooses on this machine,
against the README's fixed recipe measured in the same run.

- :func:`run`: DeiT-T/S with random weights at the deployment settings of :data:`SETTINGS` (batch 1
  compiled on 1 and 2 threads, batch 8 eager), each planned for its speedup target; a row reports
  the choice (speedup with its interquartile range over the timed runs, FLOPs ratio, one-shot top-1
  agreement with the dense model on random calibration images), the recipe and ToMe timed next to
  it, and the most faithful planned point at least as fast as the recipe. Random weights make the
  fidelity numbers say little; the speeds are what the row is for.
- :func:`digits`: the same question where fidelity means something: small ViTs trained on
  scikit-learn's digits (:mod:`cait.benchmarks.accuracy`; exact keep ratios, ``align=1``, as there),
  a plan for the recipe's own measured speedup, and the test top-1 of the planned and the recipe
  configuration at equal measured speed, one-shot and fine-tuned alike
  (:func:`cait.benchmarks.accuracy.fine_tune`).
- :func:`segmentation`: the segmentation benchmark's trained models (:mod:`cait.benchmarks.segmentation`,
  the same run folder), a plan for a speedup target with validation mIoU as fidelity, and the
  chosen configuration fine-tuned as every method there: test mIoU against dense, speedup measured
  after fine-tuning.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass

import torch

from ..benchmarks import accuracy
from ..benchmarks.latency import prepare, time_interleaved
from ..cost import default_input_size
from . import fidelity
from .candidates import generate, recipe, solved
from .result import Plan, Point
from .search import plan
from .targets import Speedup

# The targets: DeiT-S >= 1.9x and DeiT-T >= 1.7x at batch 1 compiled, DeiT-S >= 2.0x at batch 8 eager.
TINY, SMALL = "deit_tiny_patch16_224", "deit_small_patch16_224"


@dataclass(frozen=True)
class Setting:
    """One deployment to plan for: a timm ``model`` (random weights) timed at ``batch`` in ``runtime``
    on ``threads`` CPU threads, for a ``target`` speedup over the dense model."""

    model: str
    batch: int
    runtime: str
    threads: int
    target: float

    @property
    def name(self) -> str:
        return f"{self.model.split('_')[0]}_{self.model.split('_')[1][0]}-b{self.batch}-{self.runtime.replace(' ', '-')}-t{self.threads}"


SETTINGS = (
    Setting(TINY, 1, "compile", 1, 1.7),
    Setting(TINY, 1, "compile", 2, 1.7),
    Setting(SMALL, 1, "compile", 1, 1.9),
    Setting(SMALL, 1, "compile", 2, 1.9),
    Setting(SMALL, 8, "eager", 2, 2.0),
)


def _summary(p: Point | None) -> dict | None:
    if p is None:
        return None
    return {"configuration": p.key, "flops_ratio": p.flops_ratio, "speedup": p.speedup, "speedup_iqr": p.speedup_iqr,
            "repeats": p.repeats, **p.fidelity}  # fmt: skip


def compare(result: Plan) -> dict:
    """What a row reports of a plan: ``chosen`` (or ``fastest`` where the target is out of reach),
    ``recipe`` and ``tome`` (the references), and ``planned_at_recipe_speed``: the most faithful
    planned point (not a reference) measured at least as fast as the recipe."""
    references = {result.point(k).candidate.label: result.point(k) for k in result.references}
    fixed = references.get("recipe")
    timed = [p for p in result.points if p.speedup is not None and p.key not in result.references and p.candidate.method == "cait"]
    faster = [p for p in timed if fixed is not None and fixed.speedup is not None and p.speedup >= fixed.speedup]
    return {
        "reachable": result.reachable,
        "chosen": _summary(result.point(result.chosen) if result.chosen else None),
        "fastest": _summary(result.point(result.fastest) if result.fastest else None),
        "recipe": _summary(fixed),
        "tome": _summary(references.get("ToMe")),
        "planned_at_recipe_speed": _summary(max(faster, key=lambda p: (p.rank(), p.speedup), default=None)),
        "dense_ms": 1e3 * result.dense_latency_s,
        "spent_s": result.spent_s,
    }


def run(settings=SETTINGS, budget_s: float = 300.0, folder: str | None = None, calibration: int = 32, progress=None) -> list[dict]:
    """Plan every setting (``budget_s`` seconds each, no timing cache: everything timed afresh) and
    return one row per setting (:func:`compare` plus the setting). ``folder``: also write each plan's
    JSON and plot there, named by :attr:`Setting.name`. ``progress``: advanced once per setting."""
    import timm

    threads = torch.get_num_threads()
    rows = []
    try:
        for s in settings:
            torch.set_num_threads(s.threads)
            torch.manual_seed(0)
            model = timm.create_model(s.model, pretrained=False).eval()
            images = torch.randn(calibration, *default_input_size(model), generator=torch.Generator().manual_seed(0))
            result = plan(model, images, Speedup(s.target), runtime=s.runtime, batch=s.batch, device="cpu", budget_s=budget_s,
                          cache=None, progress=False)  # fmt: skip
            if folder:
                os.makedirs(folder, exist_ok=True)
                result.save(os.path.join(folder, f"{s.name}.json"))
                result.plot(os.path.join(folder, f"{s.name}.png"))
            rows.append({**asdict(s), "name": s.name, **compare(result)})
            if progress is not None:
                progress.update(1)
    finally:
        torch.set_num_threads(threads)
    return rows


def _cell(p: dict | None, metric: str = "agreement") -> str:
    if p is None or p.get("speedup") is None:
        return "-"
    iqr = p.get("speedup_iqr")
    spread = f" [{iqr[0]:.2f}-{iqr[1]:.2f}]" if iqr else ""
    return f"{p['speedup']:.2f}x{spread} at {p['flops_ratio']:.2f}, {100 * p[metric]:.1f}%"


def table(rows: list[dict]) -> str:
    """Markdown: per setting the target, the choice and the references (speedup [interquartile range]
    at FLOPs ratio, top-1 agreement with dense)."""
    lines = [
        "| model | batch, runtime, threads | target | planned choice | fixed recipe | ToMe | planned, at recipe speed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["reachable"]:
            choice = _cell(r["chosen"])
        else:
            choice = f"out of reach; fastest {_cell(r['fastest'])}" if r["fastest"] else "nothing timed: raise --budget"
        name = r["chosen"]["configuration"] if r["reachable"] else r["fastest"]["configuration"] if r["fastest"] else ""
        lines.append(f"| {r['model']} | {r['batch']}, {r['runtime']}, {r['threads']} | {r['target']:g}x | {choice} ({name}) | "
                     f"{_cell(r['recipe'])} | {_cell(r['tome'])} | {_cell(r['planned_at_recipe_speed'])} |")  # fmt: skip
    return "\n".join(lines)


def _top1(model, x, y) -> float:
    return (fidelity.outputs(model, x, "classifier").argmax(-1) == y).float().mean().item()


def digits(seeds=(0, 1, 2), epochs: int = 40, finetune_epochs: int = 15, budget_s: float = 120.0, batch: int = 64,
           calibration: int = 256, progress=None) -> list[dict]:  # fmt: skip
    """Planned against the fixed recipe at equal measured speed on the digits ViT, per seed.

    The dense model is trained on the seed's training split (:func:`cait.benchmarks.accuracy.train_dense`);
    the recipe's speedup at ``batch`` (eager, this machine) is measured first and becomes the plan's
    target; the plan measures fidelity (agreement with dense, no labels) on the first ``calibration``
    training images and times the recipe in its own run. The planned configuration compared is the
    most faithful one measured at least as fast as the recipe in that run (``planned_at_recipe_speed``
    of :func:`compare`: equal speed by measurement, not by the target). Both are scored on the test
    split one-shot and after ``finetune_epochs`` of the accuracy benchmark's fine-tuning (gates,
    distillation). Returns one dict per seed: :func:`compare`'s fields and the top-1 values."""
    rows = []
    for seed in seeds:
        train_x, train_y, test_x, test_y = accuracy.digits(seed)
        dense = accuracy.train_dense(accuracy.small_vit(seed), train_x, train_y, epochs, seed, progress)
        fixed = solved(recipe(), dense)
        images = train_x[:batch]
        runners = {k: prepare(m, images, "eager", {})[0] for k, m in (("dense", dense), ("recipe", fixed.build(dense)))}
        measured = time_interleaved(runners, images, 20, progress=False)
        needed = statistics.median(measured["dense"]) / statistics.median(measured["recipe"])
        result = plan(dense, train_x[:calibration], Speedup(needed), batch=batch, budget_s=budget_s, candidates=generate(dense, align=1),
                      cache=None, progress=False)  # fmt: skip
        row = {"seed": seed, "target": needed, **compare(result)}
        match = row["planned_at_recipe_speed"]
        planned = result.point(match["configuration"]).candidate if match else None
        for name, c in (("recipe", fixed), ("planned", planned)):
            if c is None:
                continue
            row[f"{name}_one_shot_top1"] = _top1(c.build(dense), test_x, test_y)
            tuned = accuracy.fine_tune(dense, train_x, train_y, finetune_epochs, seed, progress, merge=c.atme(), prune=c.cdcp())
            row[f"{name}_fine_tuned_top1"] = _top1(tuned, test_x, test_y)
        row["dense_top1"] = _top1(dense, test_x, test_y)
        rows.append(row)
    return rows


def digits_table(rows: list[dict]) -> str:
    """Markdown: per seed, the planned and the recipe configuration's speedup and test top-1."""
    lines = ["| seed | dense top-1 | configuration | speedup | one-shot top-1 | fine-tuned top-1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        for name, p in (("recipe", r["recipe"]), ("planned", r["planned_at_recipe_speed"])):
            if p is None or f"{name}_one_shot_top1" not in r:
                lines.append(f"| {r['seed']} | | {name}: none measured at the recipe's speed | | | |")
                continue
            lines.append(f"| {r['seed']} | {100 * r['dense_top1']:.1f}% | {name}: {p['configuration']} | {p['speedup']:.2f}x | "
                         f"{100 * r[f'{name}_one_shot_top1']:.1f}% | {100 * r[f'{name}_fine_tuned_top1']:.1f}% |")  # fmt: skip
    return "\n".join(lines)


SEGMENTATION_TARGET = 1.5  # the segmentation goal: >= 1.5x within 0.5 mIoU of dense


def segmentation(seeds=(0, 1, 2), epochs: int | None = None, finetune_epochs: int | None = None,
                 target: float = SEGMENTATION_TARGET, budget_s: float = 120.0, folder: str = "bench/runs/segmentation",
                 repeats: int = 15, progress=None) -> list[dict]:  # fmt: skip
    """Planned CAIT on the digit-canvas segmentation benchmark, per seed.

    The dense segmenter trained from scratch and its fine-tuned-alike copy (``dense``) come from (or
    go to) the benchmark's run folder ``folder``; the plan (eager, the benchmark's batch of 64, CDCP
    with ``align=1`` as there) aims at ``target`` times the dense speed, with fidelity the one-shot
    mIoU on the validation canvases (the test digits stay unseen); its choice is fine-tuned for
    ``finetune_epochs`` as every method of the benchmark and scored on the test canvases. Returns one
    dict per seed: the plan's :func:`compare` fields, ``dense_miou``, ``planned_miou`` (test, after
    fine-tuning), ``planned_speedup`` (the fine-tuned model against fine-tuned dense, interleaved)
    and the FLOPs ratio."""
    from .. import segmentation as seg
    from ..benchmarks import segmentation as bench
    from ..benchmarks.runs import RunFolder
    from ..cost import flops

    epochs = bench.EPOCHS if epochs is None else epochs
    finetune_epochs = bench.FINETUNE_EPOCHS if finetune_epochs is None else finetune_epochs
    store, rows = RunFolder(folder), []
    for seed in seeds:
        train_x, train_y, test_x, test_y = bench.canvases(seed)
        val_x, val_y = bench.validation(seed)
        test = list(zip(test_x.split(bench.BATCH), test_y.split(bench.BATCH)))
        dense = bench.trained_dense(seed, store, train_x, train_y, epochs, progress)
        warmup = bench.warmup_steps(finetune_epochs, len(train_y))
        if not store.has(seed, bench.DENSE):
            alike = bench.fine_tune_alike(dense, bench.construct(bench.DENSE, None, dense, warmup), train_x, train_y, finetune_epochs,
                                          seed, progress)  # fmt: skip
            store.save(seed, bench.DENSE, alike, {"method": bench.DENSE, "target": None, "miou": seg.evaluate(alike, test)["miou"],
                                                  "gflops": flops(alike) / 1e9, "flops_ratio": 1.0})  # fmt: skip
        result = plan(dense, val_x, Speedup(target), batch=bench.BATCH, labels=val_y, budget_s=budget_s,
                      candidates=generate(dense, align=1), cache=None, progress=False)  # fmt: skip
        row = {"seed": seed, "target": target, **compare(result), "dense_miou": store.scores(seed)[bench.DENSE]["miou"]}
        if result.reachable:
            c = result.candidate
            student = seg.make_student(dense, c.atme(), c.cdcp(), warmup)
            tuned = bench.fine_tune_alike(dense, student, train_x, train_y, finetune_epochs, seed, progress)
            seconds = time_interleaved({"dense": store.load(seed, bench.DENSE), "planned": tuned}, test_x[: bench.BATCH], repeats,
                                       progress=False)  # fmt: skip
            row.update(planned_miou=seg.evaluate(tuned, test)["miou"], planned_flops_ratio=flops(tuned) / flops(dense),
                       planned_speedup=statistics.median(seconds["dense"]) / statistics.median(seconds["planned"]))  # fmt: skip
        rows.append(row)
    return rows


def segmentation_table(rows: list[dict]) -> str:
    """Markdown: per seed the plan's choice, its speedup in the plan and after fine-tuning, and test mIoU against dense."""
    lines = ["| seed | planned configuration | FLOPs ratio | speedup (plan) | speedup (fine-tuned) | mIoU | dense mIoU | difference |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "planned_miou" not in r:
            fastest = r["fastest"]
            what = f"out of reach: fastest {fastest['configuration']}" if fastest else "nothing timed: raise --budget"
            lines.append(f"| {r['seed']} | {what} | | "
                         f"{_cell(fastest, 'miou')} | | | {100 * r['dense_miou']:.2f} | |")  # fmt: skip
            continue
        chosen = r["chosen"]
        lines.append(f"| {r['seed']} | {chosen['configuration']} | {r['planned_flops_ratio']:.3f} | {chosen['speedup']:.2f}x | "
                     f"{r['planned_speedup']:.2f}x | {100 * r['planned_miou']:.2f} | {100 * r['dense_miou']:.2f} | "
                     f"{100 * (r['planned_miou'] - r['dense_miou']):+.2f} |")  # fmt: skip
    return "\n".join(lines)
