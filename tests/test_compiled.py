"""cait.optimize: dense and compressed models compiled the same way (inductor, weight freezing, one
graph), equal to eager; the benchmark runtimes (eager / compile / onnxruntime) and `cait bench --deploy`."""

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import cait
from cait.benchmarks import deploy
from cait.benchmarks.latency import compare
from conftest import rel_err
from test_cli import run


def small(seed=0, depth=1, img_size=80):
    """One DeiT-T-width block on a 5x5 grid (odd: border tiles), random weights from ``seed``."""
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", depth=depth, img_size=img_size).eval()


def compressed(seed=0):
    return cait.compress(small(seed), merge=cait.ATME(r=4), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.5)).eval()


def test_compressed_model_compiles_to_one_frozen_graph_equal_to_eager():
    fast = compressed()
    torch._dynamo.reset()
    counters.clear()
    compiled = cait.optimize(fast, torch.randn(2, 3, 80, 80))
    assert compiled.compile_seconds > 0 and compiled.error < 1e-5
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > 0, "weights were not frozen and packed"
    assert counters["stats"]["unique_graphs"] == 1  # fullgraph=True: a graph break would have raised
    images = torch.randn(2, 3, 80, 80)
    with torch.inference_mode():
        assert rel_err(compiled(images), fast(images)) < 1e-5
        other = torch.randn(1, 3, 80, 80)  # another batch size compiles again, still frozen
        assert rel_err(compiled(other), fast(other)) < 1e-5


def test_two_models_of_one_architecture_keep_their_own_weights():
    """Freezing turns weights into constants: a second model must not reuse the first one's graph."""
    first, second = compressed(0), compressed(1)
    images = torch.randn(1, 3, 80, 80)
    a, b = cait.optimize(first, images), cait.optimize(second, images)
    with torch.inference_mode():
        expected = first(images), second(images)
        assert rel_err(a(images), expected[0]) < 1e-5 and rel_err(b(images), expected[1]) < 1e-5
    assert rel_err(expected[0], expected[1]) > 0.1


def test_a_dense_timm_model_compiles_the_same_way():
    dense = small()
    images = torch.randn(1, 3, 80, 80)
    compiled = cait.optimize(dense, images)
    with torch.inference_mode():
        assert rel_err(compiled(images), dense(images)) < 1e-5


@pytest.mark.parametrize(
    "model, example, error, message",
    [
        (lambda: small().train(), torch.randn(1, 3, 80, 80), ValueError, "training mode"),
        (small, torch.randn(1, 3, 80, 80, dtype=torch.float64), ValueError, "float32 on cpu but the example torch.float64"),
        (small, [1, 2], TypeError, "example must be a tensor"),
        (lambda: "model", torch.randn(1, 3, 80, 80), TypeError, "model must be an nn.Module"),
    ],
)
def test_bad_arguments_are_refused(model, example, error, message):
    with pytest.raises(error, match=message):
        cait.optimize(model(), example)


def test_benchmark_times_every_runtime_against_dense_in_the_same_runtime():
    models = {"dense": small(), "merge=0.8": cait.compress(small(), merge=cait.ATME(r=4)).eval()}
    rows = compare("tiny", models, 1, 2, runtimes=("eager", "compile", "onnxruntime"), progress=False)
    assert [(r.runtime, r.variant) for r in rows] == [(rt, v) for rt in ("eager", "compile", "onnxruntime") for v in models]
    for r in rows:
        assert r.baseline == ("dense" if r.runtime == "eager" else f"dense [{r.runtime}]")
        assert (r.setup_s is None) == (r.runtime == "eager") and r.threads == torch.get_num_threads()
        assert (r.merge_share is not None) == (r.runtime == "eager" and r.variant != "dense")
    assert [r.speedup for r in rows if r.variant == "dense"] == [1.0, 1.0, 1.0]
    assert len({r.flops_ratio for r in rows if r.variant != "dense"}) == 1 and rows[1].flops_ratio < 0.95


def test_deploy_command_runs_the_table_it_is_given(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_run(models, variants, runtimes, threads, repeats, progress=None):
        seen.update(models=models, variants=variants, runtimes=runtimes, threads=threads, repeats=repeats)
        return []

    monkeypatch.setattr(deploy, "run", fake_run)
    assert run(["bench", "--deploy", "--models", "deit_tiny_patch16_224", "--threads", "1", "--runtime", "eager", "compile"]) == 0
    assert seen == dict(models=["deit_tiny_patch16_224"], variants=list(deploy.VARIANTS), runtimes=["eager", "compile"], threads=[1],
                        repeats=15)  # fmt: skip
    assert run(["bench", "--deploy"]) == 0
    assert seen["runtimes"] == list(deploy.RUNTIMES) and seen["threads"] == [1, 2] and seen["models"] == list(deploy.MODELS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--threads", "1", "2"], "several only with --deploy"),
        (["bench", "--threads", "0"], "--threads takes one count >= 1"),
        (["bench", "--deploy", "--batch", "8"], "batch 1 only"),
        (["bench", "--deploy", "--all"], "--deploy runs on its own"),
        (["bench", "--all", "--compile"], "--runtime/--compile choose"),
        (["bench", "--runtime", "onnxruntime", "--device", "cpu", "--variant", "merge=0.7,align=8"], "align applies to pruning"),
        (["bench", "--variant", "prune=0.5/0.5/0.5,align=8/8/8"], "align takes one multiple or two"),
    ],
)
def test_bench_errors_are_one_line(argv, message, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
