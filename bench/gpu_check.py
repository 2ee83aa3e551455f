"""The one-call GPU check (run it through ``bench/gpu_check.sh OUT_DIR``).

On a bare GPU machine, with that machine's own python, torch, triton and timm (no installs, no network;
``PYTHONPATH=.``), in one time budget (default 400 s, for a 7-minute slot on an H100/H200):

1. ``env``: versions and the GPU;
2. ``tests``: the kernel tests natively (``TRITON_INTERPRET=0``): the ``gpu``-marked tests and the
   Triton kernel, degenerate-input, precision, model-extremes and property test files (the C++ CPU
   kernel's cases left out);
3. ``large batch``: ``bench/large_batch.py``: the Triton ops at batches past CUDA's 65535 limit on grid
   axis y (attention at 6000 x 12 heads, ATME and unmerge at 70000 images) and at tensors past ``2**31``
   elements, each against the reference on its first and last images (~12 GiB, seconds);
4. ``kernels``: ``cait bench --kernels``: attention vs SDPA without bias, SDPA with a float mask and
   FlexAttention with a ``log(size)`` score_mod; the ATME step and unmerge vs their references; the
   ahead-of-time compile report;
5. ``models``: per model (DeiT-T/S/B), fp16, batch 1/64/256: dense timm, compressed on the Triton ops and on
   the reference ops, eager and CUDA graph;
6. ``compile``: DeiT-T/S at batch 1 and 8 under :func:`cait.optimize` (inductor with frozen weights in
   a CUDA graph; last: compiling costs the most time).

Every step runs in its own process with a time box (its share of the budget, cut to what is left), its
output in ``OUT_DIR/<step>.log``; a step that fails, times out or lacks a package gets a clear line and
the next one runs. ``OUT_DIR/summary.json`` and ``summary.md`` hold the statuses and the tables the
steps printed; a short table goes to stdout. Exit status 1 if any step failed or timed out.

``--dry-run`` runs the same steps on the CPU in seconds: the Triton kernels through the interpreter,
tests collected but not run, tiny shapes (the large-batch cases too), one tiny model (compiled by
:func:`cait.optimize` on the CPU), no CUDA graphs. ``make test`` runs it, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

TEST_FILES = (
    "tests/test_gpu.py",
    "tests/test_atme_triton.py",
    "tests/test_attention_triton.py",
    "tests/test_unmerge.py",
    "tests/test_model_triton.py",
    "tests/test_degenerate.py",
    "tests/test_precision.py",
    "tests/test_model_extremes.py",
    "tests/test_properties.py",
)
MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
VARIANT = "merge=0.7,prune=0.5/0.75/0.75"
LARGE_BATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "large_batch.py")
ENV_SCRIPT = """
import json, platform, sys
info = {"python": platform.python_version()}
for name in ("torch", "triton", "timm", "hypothesis", "pytest"):
    try:
        info[name] = __import__(name).__version__
    except ImportError:
        info[name] = None
import torch
info["cuda"] = torch.version.cuda
info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps(info))
"""


@dataclass
class Step:
    """One command of the check: ``share`` is its time box in seconds (cut to what is left of the budget);
    ``needs`` the Python modules it cannot run without."""

    name: str
    argv: list[str]
    share: float
    needs: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class Outcome:
    name: str
    status: str  # ok, failed, timeout, skipped
    seconds: float
    note: str
    log: str | None
    tables: list[str]


def plan(out: str, dry_run: bool, python: str = sys.executable) -> list[Step]:
    """The steps of the check (``dry_run``: the CPU versions, in seconds)."""
    bench = [python, "-m", "cait", "bench"]
    interpret = {"TRITON_INTERPRET": "1" if dry_run else "0"}
    files = [f for f in TEST_FILES if f != "tests/test_properties.py" or have("hypothesis")]
    skipped_files = "" if len(files) == len(TEST_FILES) else "test_properties.py left out (no hypothesis)"
    # "not cpu and not auto": the C++ CPU kernel's cases are not what a GPU run is for (and would build it first)
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not cpu and not auto", *files]
    if dry_run:
        steps = [
            Step("tests", [*pytest, "--collect-only"], 60, ("pytest", "timm"), interpret, "collected, not run (dry run)"),
            Step("large batch", [python, LARGE_BATCH, "--dry-run"], 60, (), interpret, "tiny shapes (dry run)"),
            Step("kernels", [*bench, "--kernels", "--tiny", "--out", f"{out}/kernels.json"], 120, ("timm",), interpret),
        ]
        tiny = ["--models", MODELS[0], "--img-size", "64", "--batch", "2", "--repeats", "1", "--variant", VARIANT, "--device", "cpu"]
        steps.append(Step("models", [*bench, *tiny, "--out", f"{out}/models.json"], 120, ("timm",), interpret))
        steps.append(Step("compile", [*bench, *tiny, "--runtime", "compile", "--out", f"{out}/compile.json"], 180, ("timm",), interpret))
    else:
        steps = [
            Step("tests", [*pytest, "-rfE", "--junitxml", f"{out}/tests.xml"], 110, ("pytest", "timm"), interpret, skipped_files),
            Step("large batch", [python, LARGE_BATCH], 60, (), interpret),
            Step("kernels", [*bench, "--kernels", "--out", f"{out}/kernels.json"], 90, ("timm",), interpret),
        ]
        table = ["--batch", "1", "64", "256", "--variant", VARIANT, "--device", "cuda", "--dtype", "fp16"]
        for model in MODELS:
            argv = [*bench, "--models", model, *table, "--cuda-graph", "--repeats", "10", "--out", f"{out}/models-{model}.json"]
            steps.append(Step(f"models {model}", argv, 25, ("timm",), interpret))
        for model in MODELS[:2]:  # cait.optimize: inductor with frozen weights in a CUDA graph, about a minute per model
            argv = [*bench, "--models", model, "--batch", "1", "8", "--variant", VARIANT, "--device", "cuda", "--dtype", "fp16"]
            argv += ["--runtime", "compile", "--repeats", "10", "--out", f"{out}/compile-{model}.json"]
            steps.append(Step(f"compile {model}", argv, 60, ("timm",), interpret))
    return [Step("env", [python, "-c", ENV_SCRIPT], 20), *steps]


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_steps(steps: list[Step], out: str, budget: float) -> list[Outcome]:
    """Run ``steps`` in order within ``budget`` seconds; one :class:`Outcome` each, whatever happens."""
    deadline = time.monotonic() + budget
    outcomes = []
    for step in steps:
        missing = [m for m in step.needs if not have(m)]
        left = deadline - time.monotonic()
        if missing or left < 5:
            reason = f"needs {', '.join(missing)}, not installed" if missing else "out of time (budget spent)"
            outcomes.append(Outcome(step.name, "skipped", 0.0, reason, None, []))
            continue
        log = os.path.join(out, step.name.replace(" ", "-") + ".log")
        start = time.monotonic()
        status, note = "ok", step.note
        with open(log, "w") as sink:  # its own session: a time-out ends the step's worker processes too
            env = {**os.environ, **step.env}
            child = subprocess.Popen(step.argv, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                if child.wait(timeout=min(step.share, left)):
                    status, note = "failed", f"exit status {child.returncode}: {last_line(log)}"
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                status, note = "timeout", f"stopped after {min(step.share, left):.0f} s (its time box); what it printed is in the log"
        outcomes.append(Outcome(step.name, status, time.monotonic() - start, note, log, tables(log)))
    return outcomes


def last_line(log: str) -> str:
    """The last non-empty line of ``log`` (usually the error)."""
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def tables(log: str) -> list[str]:
    """The Markdown tables a step printed (runs of lines starting with ``|``)."""
    found, current = [], []
    with open(log, errors="replace") as f:
        for line in f:
            if line.startswith("|"):
                current.append(line.rstrip())
            elif current:
                found.append("\n".join(current))
                current = []
    if current:
        found.append("\n".join(current))
    return found


def environment(outcomes: list[Outcome]) -> dict:
    """The ``env`` step's JSON, or {} if it did not run."""
    env = next((o for o in outcomes if o.name == "env" and o.status == "ok"), None)
    if env is None:
        return {}
    with open(env.log) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def summary_table(outcomes: list[Outcome]) -> str:
    lines = ["| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.note.replace('|', '/')} |" for o in outcomes]
    return "\n".join(lines)


def write_summary(outcomes: list[Outcome], out: str, dry_run: bool, budget: float) -> None:
    env = environment(outcomes)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"dry_run": dry_run, "budget_s": budget, "environment": env, "steps": [asdict(o) for o in outcomes]}, f, indent=2)
    parts = [f"# cait GPU check{' (dry run on the CPU)' if dry_run else ''}", ""]
    parts.append(", ".join(f"{k} {v}" for k, v in env.items()) or "environment unknown (the env step did not run)")
    parts += ["", summary_table(outcomes)]
    for o in outcomes:
        if o.tables or o.status in ("failed", "timeout"):
            parts += ["", f"## {o.name} ({o.status})", ""]
            parts += o.tables if o.tables else [f"`{o.note}`"]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(parts) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="OUT_DIR", help="where the logs, summary.json and summary.md go (created)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes (seconds)")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for all steps together (default: 400)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    outcomes = run_steps(plan(args.out, args.dry_run), args.out, args.budget)
    write_summary(outcomes, args.out, args.dry_run, args.budget)
    print(summary_table(outcomes))
    print(f"\nlogs, summary.json and summary.md in {args.out}")
    return int(any(o.status in ("failed", "timeout") for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
