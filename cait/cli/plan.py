"""``cait plan``: search merge schedules and CDCP keep ratios for a speed target measured on this device."""

from __future__ import annotations

import argparse
import math
import os

from .common import DTYPES, add_model_arguments, build_model, check_output, device_of, load_images

PLAN_EXAMPLES = """examples:
  cait plan --model deit_small_patch16_224 --checkpoint deit_s.pth --target-speedup 1.9 --batch 1 --runtime compile \\
      --calibration val_images/ --out plan.json          # also writes plan.png
  cait compress --plan plan.json --checkpoint deit_s.pth --out deit_s_planned.safetensors
  cait finetune --plan plan.json --checkpoint deit_s.pth --data imagenet --epochs 30 --out runs/deit_s_planned
"""
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cait", "plan-timings.json")


def add_parser(commands) -> None:
    p = commands.add_parser(
        "plan",
        help="find the most faithful compression that meets a speed target on this device",
        epilog=PLAN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure merge schedules (several shapes, 2x2 and 4x4 tiles) crossed with CDCP keep ratios on this "
        "machine, each timed against the dense model in the same runtime and process, and choose the one most faithful "
        "to the dense model (top-1 agreement and KL on calibration images; feature cosine for backbones) that meets the "
        "target. Writes the plan (JSON: every measured point, the Pareto front, the choice, the machine) and a plot; "
        "`cait compress --plan` and `cait finetune --plan` build the chosen model.",
    )
    add_model_arguments(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-speedup", type=float, metavar="X", help="at least X times the dense model's images/s")
    target.add_argument("--target-latency-ms", type=float, metavar="MS", help="at most MS milliseconds per batch")
    target.add_argument("--target-flops", type=float, metavar="F", help="at most F of the dense FLOPs (F in (0, 1])")
    p.add_argument("--batch", type=int, default=1, help="images per forward when timing (default: 1)")
    p.add_argument(
        "--runtime",
        choices=("eager", "compile", "onnxruntime", "cuda-graph"),
        default="eager",
        help="how the model will be deployed; dense and candidates are timed alike: eager (PyTorch), compile "
        "(cait.optimize), onnxruntime (cait.export, CPU), cuda-graph (CUDA only) (default: eager)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="where to time (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights and images (default: fp32)")
    p.add_argument("--calibration", metavar="DIR", help="folder of images (searched recursively) to measure fidelity on")
    p.add_argument("--calibration-images", type=int, default=64, metavar="N", help="how many calibration images (default: 64)")
    p.add_argument("--budget", type=float, default=600, metavar="S", help="seconds the search may take, about (default: 600)")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed runs per candidate in the first rung, doubled in each later one (default: 5)"
    )
    p.add_argument("--cache", default=DEFAULT_CACHE, metavar="FILE", help=f"measured timings kept between runs (default: {DEFAULT_CACHE})")
    p.add_argument("--no-cache", action="store_true", help="time everything afresh and keep nothing")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the plan (.json); the plot goes next to it (.png)")
    p.set_defaults(run=run)


def target_of(args):
    from cait.planner import FlopsRatio, Latency, Speedup

    if args.target_speedup is not None:
        return Speedup(args.target_speedup)
    if args.target_latency_ms is not None:
        return Latency(ms=args.target_latency_ms)
    return FlopsRatio(args.target_flops)


def run(args) -> None:
    import sys

    import torch

    import cait
    from cait.cost import default_input_size

    check_output(args.out)
    if not args.out.endswith(".json"):
        raise ValueError(f"--out {args.out}: a plan file ends in .json (the plot is written next to it as .png)")
    target = target_of(args)  # refuses a bad target before any work
    for flag, value in (("--batch", args.batch), ("--repeats", args.repeats), ("--calibration-images", args.calibration_images)):
        if value < 1:
            raise ValueError(f"{flag} must be 1 or more, got {value}")
    if not math.isfinite(args.budget) or args.budget <= 0:
        raise ValueError(f"--budget must be positive, finite seconds, got {args.budget}")
    if args.num_classes is not None and args.num_classes < 0:
        raise ValueError(f"--num-classes must be 0 (no head) or more, got {args.num_classes}")
    if args.calibration and not os.path.isdir(args.calibration):
        raise ValueError(f"--calibration {args.calibration!r} is not a folder")
    device = device_of(args.device)
    runtime = args.runtime.replace("-", " ")
    if runtime == "cuda graph" and device.type != "cuda":
        raise ValueError("--runtime cuda-graph needs --device cuda")
    model = build_model(args).to(device=device, dtype=getattr(torch, DTYPES[args.dtype]))
    if args.calibration:
        images = load_images(args.calibration, model, args.calibration_images)
    else:
        print("warning: no --calibration: fidelity is measured on random images", file=sys.stderr)
        size = default_input_size(model)
        images = torch.randn(min(args.calibration_images, 32), *size, generator=torch.Generator().manual_seed(0))
    plan = cait.plan(
        model, images, target, runtime=runtime, batch=args.batch, device=device, budget_s=args.budget, repeats=args.repeats,
        cache=None if args.no_cache else args.cache,
    )  # fmt: skip
    plan.save(args.out)
    picture = os.path.splitext(args.out)[0] + ".png"
    plan.plot(picture)
    print(plan.table(), "\n")
    print(f"target    {target} ({runtime}, batch {args.batch}, {plan.machine.get('gpu') or plan.machine['cpu']}, "
          f"{plan.machine['threads']} thread{'s' if plan.machine['threads'] != 1 else ''})")  # fmt: skip
    print(f"{'chosen' if plan.reachable else 'result'}    {plan.summary()}")
    searched = [p for p in plan.points if not p.candidate.label]  # the labelled ones are the references
    timed = sum(p.speedup is not None for p in searched)
    print(f"spent     {plan.spent_s:.0f} s of {plan.budget_s:.0f}: fidelity of {len(searched)} of {plan.considered} configurations, "
          f"{timed} timed (and {len(plan.references)} references)")  # fmt: skip
    print(f"wrote {args.out} and {picture}")
