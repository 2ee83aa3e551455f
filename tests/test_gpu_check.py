"""bench/gpu_check.sh: its dry run on the CPU (the same steps, tiny shapes) is green, and the driver
reports a failing, timed-out or unrunnable step with a clear line and goes on with the next."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_is_green(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it per step
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
        env=dict(env, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    statuses = {step["name"]: step["status"] for step in summary["steps"]}
    assert done.returncode == 0, (statuses, done.stdout[-3000:])
    assert statuses == dict.fromkeys(["env", "tests", "large batch", "kernels", "models", "compile"], "ok")
    assert summary["dry_run"] and summary["environment"]["torch"]
    markdown = (tmp_path / "summary.md").read_text()
    assert "| attention" in markdown and "flex" in markdown  # the kernel table, with the FlexAttention peer
    assert "| ATME step 4x4" in markdown and "| unmerge 4x4" in markdown  # the large-batch table (tiny shapes)
    assert "| compile |" in markdown and "| deit_tiny_patch16_224 |" in markdown  # the model tables, compiled too
    assert "| compile | ok |" in done.stdout


def test_failures_are_reported_and_the_next_step_runs(driver, tmp_path):
    python = sys.executable
    steps = [
        driver.Step("prints a table", [python, "-c", "print('| a | b |'); print('|---|---|'); print('| 1 | 2 |')"], 30),
        driver.Step("fails", [python, "-c", "import sys; print('something broke'); sys.exit(3)"], 30),
        driver.Step("hangs", [python, "-c", "import time; time.sleep(60)"], 2),
        driver.Step("needs a package", [python, "-c", "pass"], 30, ("no_such_package_here",)),
        driver.Step("runs after all that", [python, "-c", "pass"], 30),
    ]
    outcomes = driver.run_steps(steps, str(tmp_path), budget=60)
    assert [o.status for o in outcomes] == ["ok", "failed", "timeout", "skipped", "ok"]
    assert outcomes[0].tables == ["| a | b |\n|---|---|\n| 1 | 2 |"]
    assert "exit status 3: something broke" in outcomes[1].note
    assert "time box" in outcomes[2].note and outcomes[2].seconds < 30
    assert "no_such_package_here" in outcomes[3].note
    driver.write_summary(outcomes, str(tmp_path), dry_run=False, budget=60)
    markdown = (tmp_path / "summary.md").read_text()
    assert "## fails (failed)" in markdown and "## hangs (timeout)" in markdown and "| 1 | 2 |" in markdown


def test_a_spent_budget_skips_the_rest(driver, tmp_path):
    steps = [driver.Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 30), driver.Step("late", ["true"], 30)]
    outcomes = driver.run_steps(steps, str(tmp_path), budget=6)
    assert [o.status for o in outcomes] == ["timeout", "skipped"] and "out of time" in outcomes[1].note
