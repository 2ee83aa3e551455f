"""`cait bench --all --quick`: the report folder (JSON valid against the schema, Markdown, PNG plots)."""

import json

import jsonschema
import pytest
from PIL import Image

from cait.benchmarks import report
from cait.benchmarks.latency import method_of, parse_variant
from test_cli import run


def write_results(folder):
    """Accuracy and segmentation files in the format their benchmarks write."""
    machine = {"cpu": "test CPU", "threads": 2}
    accuracy = [
        {"method": "dense", "flops_ratio": 1.0, "top1_mean": 0.97, "top1_std": 0.01, "img_per_s": 1000.0},
        {"method": "CAIT (fine-tuned)", "flops_ratio": 0.5, "top1_mean": 0.96, "top1_std": 0.02, "img_per_s": 1500.0},
    ]
    segmentation = [
        {"method": "dense", "flops_ratio": 1.0, "miou_mean": 0.5, "miou_std": 0.01, "img_per_s": 800.0},
        {"method": "ToMe + unmerge", "flops_ratio": 0.6, "miou_mean": 0.45, "miou_std": 0.02, "img_per_s": 900.0},
    ]
    curve = [
        {"method": "dense", "target": 1.0, "flops_ratio": 1.0, "top1_mean": 0.97, "top1_std": 0.01, "img_per_s": 1000.0},
        {"method": "CAIT (fine-tuned)", "target": 0.6, "flops_ratio": 0.6, "top1_mean": 0.968, "top1_std": 0.0, "img_per_s": 1500.0},
        {"method": "CAIT (fine-tuned)", "target": 0.4, "flops_ratio": 0.4, "top1_mean": 0.95, "top1_std": 0.01, "img_per_s": 2100.0},
        {"method": "ToMe one-shot", "target": 0.6, "flops_ratio": 0.6, "top1_mean": 0.9, "top1_std": 0.02, "img_per_s": 1450.0},
    ]
    files = (("accuracy-digits.json", accuracy), ("accuracy-curve-digits.json", curve), ("segmentation-digits.json", segmentation))
    for name, rows in files:
        (folder / name).write_text(json.dumps({"machine": machine, "settings": {"seeds": [0, 1, 2]}, "rows": rows}))


def check_png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200


@pytest.mark.parametrize("with_results", [True, False])
def test_quick_report_writes_valid_json_markdown_and_plots(tmp_path, capsys, with_results):
    results = tmp_path / "results"
    results.mkdir()
    if with_results:
        write_results(results)
    out = tmp_path / "report"
    argv = ["bench", "--all", "--quick", "--device", "cpu", "--models", "deit_tiny_patch16_224", "--batch", "1", "--repeats", "2"]
    assert run(argv + ["--results", str(results), "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    jsonschema.validate(data, report.SCHEMA)
    methods = {r["method"] for r in data["models"]}
    assert methods == {"dense", "ToMe", "CAIT"} and len(data["models"]) == 1 + len(report.QUICK_VARIANTS)
    assert data["machine"]["cores"] >= 1 and data["settings"]["quick"] is True and data["kernels"] == []
    for name in report.PLOTS:
        check_png(out / name)
    text = (out / "report.md").read_text()
    assert "| deit_tiny_patch16_224 | CAIT |" in text and "need a CUDA GPU" in text
    assert data["deployment"] == [] and "`cait bench --deploy` times it on its own" in text  # --quick does not compile
    assert all((r["merge_share"] is None) == (r["method"] == "dense") for r in data["models"])
    if with_results:
        assert data["accuracy"]["rows"][1]["method"] == "CAIT (fine-tuned)" and "96.00 ± 2.00" in text
        assert "## Accuracy curve (digits)" in text and "| CAIT (fine-tuned) | 0.400 | 95.00 ± 1.00 | 2100 |" in text
        assert "measured on test CPU" in text
    else:
        assert data["accuracy"] is None and data["curve"] is None and data["segmentation"] is None
        assert "No results: run `cait bench --accuracy --curve --out" in text
    assert "wrote" in capsys.readouterr().out


def test_the_schema_refuses_a_broken_report(tmp_path):
    write_results(tmp_path)
    row = {"model": "m", "variant": "dense", "method": "dense", "batch": 1, "gflops": 1.0, "params_m": 1.0, "img_per_s": 5.0,
           "speedup": 1.0, "flops_ratio": 1.0, "efficiency": 1.0}  # fmt: skip
    machine = {"cpu": "c", "cores": 2, "threads": 2, "python": "3", "torch": "t", "triton": "t", "timm": "t"}
    settings = {"device": "cpu", "dtype": "float32", "quick": True, "models": ["m"], "batches": [1], "variants": [], "repeats": 1,
                "cuda_graph": False}  # fmt: skip
    good = {"version": report.VERSION, "machine": machine, "settings": settings, "models": [row], "kernels": [],
            "kernel_ceilings": None, **report.read_results(str(tmp_path)), "files": {"report": "report.md", "plots": []}}  # fmt: skip
    jsonschema.validate(good, report.SCHEMA)
    deployed = {**row, "runtime": "compile", "threads": 1, "setup_s": 20.0}
    jsonschema.validate({**good, "deployment": [deployed]}, report.SCHEMA)
    no_runtime = {k: v for k, v in deployed.items() if k != "runtime"}
    for broken in ({**good, "models": []}, {**good, "models": [{**row, "img_per_s": 0}]}, {**good, "version": "other"},
                   {**good, "deployment": [no_runtime]}):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, report.SCHEMA)


def test_variant_names_map_to_methods():
    assert [method_of(v) for v in ("dense", "tome=0.6", "merge=0.7", "prune=0.5/0.5/0.5", "merge=0.7,prune=0.5/0.75/0.75 [graph]")] == [
        "dense", "ToMe", "ATME", "CDCP", "CAIT [graph]"]  # fmt: skip
    assert parse_variant("tome=0.6") == ("tome", 0.6)
    with pytest.raises(ValueError, match="tome=0.6"):
        parse_variant("tome=fast")


def test_all_refuses_flags_it_does_not_use(capsys):
    assert run(["bench", "--all", "--variant", "merge=0.7"]) == 2
    assert "--all picks variants" in capsys.readouterr().err
