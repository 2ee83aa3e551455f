"""Export for deployment: pt2 round trip in a fresh process, ONNX in onnxruntime (owners and ties
exact), AOTInductor, torch.jit.trace refused, and every bad argument of `cait export` as one line."""

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from torch import nn

import cait
from cait.exported import OnnxRunner, load_exported, onnx_translations
from cait_kernels import atme_step_reference
from conftest import rel_err
from test_atme import CASES, TIE_GRIDS, TIE_KINDS, merged_state, tie_case
from test_cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(depth=2, img_size=96, **overrides):
    """A DeiT-T-width model on a small odd grid (6x6 at 96 px: border-free; 5x5 at 80 px: odd)."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=depth, img_size=img_size, **overrides).eval()


@pytest.fixture(scope="module")
def compressed():
    return cait.compress(small(img_size=80), merge=cait.ATME(r=[4, 3]), prune=cait.CDCP(qk=0.5, v=0.75, mlp=0.5)).eval()


class LogitsAndOwners(nn.Module):
    """Logits and the final owner map side by side (owners as floats: exact below 2**24)."""

    def __init__(self, model):
        super().__init__()
        self.backbone = model  # the name cait.cost.default_input_size looks for

    def forward(self, images):
        state = self.backbone.forward_tokens(images)
        logits = self.backbone.forward_head(state.x, size=state.size)
        return torch.cat([logits, state.owner.float()], dim=1)


def test_pt2_loads_in_a_fresh_process_and_takes_any_batch(compressed, tmp_path):
    path = tmp_path / "m.pt2"
    done = cait.export(compressed, path, format="pt2", batch=2, dynamic_batch=True)
    assert done.error < 1e-6 and path.exists()
    images = torch.randn(3, 3, 80, 80)
    with torch.inference_mode():
        expected = compressed(images)
    torch.save({"images": images, "expected": expected}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch, cait_kernels
        program = torch.export.load({str(path)!r})
        names = {{str(n.target) for n in program.graph.nodes if n.op == "call_function"}}
        assert "cait_cpu.atme_step.default" in names, names  # the fused C++ step, not the reference
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.inference_mode():
            out = program.module()(io["images"])
        print(float((out - io["expected"]).norm() / io["expected"].norm()))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-6


def test_onnx_has_only_standard_operators_and_onnxruntime_gives_the_same_owners(compressed, tmp_path):
    import onnx

    path = tmp_path / "m.onnx"
    cait.export(LogitsAndOwners(compressed).eval(), path, format="onnx", batch=1, dynamic_batch=True)
    graph = onnx.load(path).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "custom ONNX domains need a runtime plugin"
    images = torch.randn(2, 3, 80, 80)
    with torch.inference_mode():
        expected = LogitsAndOwners(compressed)(images)
    out = OnnxRunner(str(path), threads=1)(images)
    assert torch.equal(out[:, 1000:], expected[:, 1000:])  # the same cells merged, in onnxruntime
    assert rel_err(out[:, :1000], expected[:, :1000]) < 1e-5


class Step(nn.Module):
    def __init__(self, **args):
        super().__init__()
        self.args = args

    def forward(self, x, metric, size, owner):
        return atme_step_reference(x, metric, size, owner, **self.args)


def onnxruntime_step(tmp_path, x, metric, size, owner, **args):
    """One ATME step exported to ONNX (reference math, stable sorts as TopK) and run in onnxruntime."""
    with torch.no_grad():
        program = torch.onnx.export(Step(**args).eval(), (x, metric, size, owner), dynamo=True,
                                    custom_translation_table=onnx_translations(), verbose=False)  # fmt: skip
    program.save(tmp_path / "step.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, metric, size, owner))}
    return [torch.from_numpy(t) for t in session.run(None, feeds)]


@pytest.mark.parametrize("grid, block", [TIE_GRIDS[1], TIE_GRIDS[3]])  # odd grids, 2x2 and 4x4 tiles
@pytest.mark.parametrize("kind", TIE_KINDS)
def test_onnx_breaks_exact_ties_like_the_reference(grid, block, kind, tmp_path):
    """Every similarity tied (or few distinct values): only the tie rule decides, through ONNX TopK."""
    x, size, owner, metric, r = tie_case(grid, block, kind, torch.float32)
    args = dict(r=r, grid=grid, prefix=1, block=block)
    out = onnxruntime_step(tmp_path, x, metric, size.float(), owner, **args)
    ref = atme_step_reference(x, metric, size.float(), owner, **args)
    assert torch.equal(out[2], ref[2]) and torch.equal(out[1], ref[1]) and rel_err(out[0], ref[0]) < 1e-6


@pytest.mark.parametrize("grid, block, batch, prefix, steps, r", [CASES[1], CASES[5]])
def test_onnx_step_matches_the_reference_on_merged_states(grid, block, batch, prefix, steps, r, tmp_path):
    x, size, owner = merged_state(batch, grid, 12, prefix, block, steps)
    x, size = x.float(), size.float()
    metric = torch.randn(x.shape[0], x.shape[1], 7)
    args = dict(r=r, grid=grid, prefix=prefix, block=block)
    out = onnxruntime_step(tmp_path, x, metric, size, owner, **args)
    ref = atme_step_reference(x, metric, size, owner, **args)
    assert torch.equal(out[2], ref[2]) and torch.equal(out[1], ref[1]) and rel_err(out[0], ref[0]) < 1e-6


def test_aoti_package_runs_the_compiled_model(tmp_path):
    fast = cait.compress(small(depth=1, img_size=64), merge=cait.ATME(r=3), prune=cait.CDCP(qk=0.5, v=0.75)).eval()
    done = cait.export(fast, tmp_path / "m.aoti.pt2", format="aoti", batch=2)
    assert done.error < 1e-5
    images = torch.randn(2, 3, 64, 64)
    runner = load_exported(tmp_path / "m.aoti.pt2")
    with torch.inference_mode():
        assert rel_err(runner(images), fast(images)) < 1e-5
    with torch.inference_mode():  # other strides are made contiguous (the compiled code assumes the traced ones)
        for strided in (images.contiguous(memory_format=torch.channels_last), torch.randn(4, 3, 64, 64)[::2]):
            assert rel_err(runner(strided), fast(strided)) < 1e-5
    # the compiled code would read any input at its traced shape: the runner refuses others
    for other, what in [(torch.randn(3, 3, 64, 64), r"shape \(3, 3, 64, 64\)"), (torch.randn(2, 3, 80, 80), "shape"),
                        (images.double(), "float64 images"), (images.numpy(), "ndarray")]:  # fmt: skip
        with pytest.raises(ValueError, match=r"compiled for float32 images of shape \(2, 3, 64, 64\) on cpu, got .*" + what):
            runner(other)
    (tmp_path / "junk.aoti.pt2").write_bytes(b"junk")
    with pytest.raises(ValueError, match="is not an AOTInductor package that loads here"):
        load_exported(tmp_path / "junk.aoti.pt2")


def test_onnx_export_holds_back_the_expected_constant_folding_warnings(compressed, tmp_path, caplog):
    """At a fixed batch onnxscript's optimizer meets constant TopKs (the merge step's stable sorts) and
    would warn once per merging block that it cannot fold them."""
    with caplog.at_level(logging.WARNING):
        cait.export(compressed, tmp_path / "m.onnx", format="onnx")
    assert not [r for r in caplog.records if "constant folding" in r.getMessage()]
    assert logging.getLogger("onnxscript.optimizer._constant_folding").level == logging.NOTSET  # restored


def test_a_dense_timm_model_exports_the_same_way(tmp_path):
    dense = small(depth=1, img_size=64)
    assert cait.export(dense, tmp_path / "d.onnx", format="onnx").error < 1e-5
    assert cait.export(dense, tmp_path / "d.pt2", format="pt2").error < 1e-6


def test_jit_trace_is_refused_with_one_sentence(compressed):
    with pytest.raises(NotImplementedError, match=r"torch.jit.trace cannot record a compressed model.*cait export"):
        torch.jit.trace(compressed, torch.randn(1, 3, 80, 80), check_trace=False)


def test_jit_script_is_refused_with_one_sentence(compressed):
    from cait.segmentation import segmenter

    for model in (compressed, segmenter(compressed, 3)):  # also as a submodule
        with pytest.raises(NotImplementedError, match=r"torch.jit.script cannot compile a compressed model.*cait export"):
            torch.jit.script(model)


def test_a_dynamic_size_model_exports_at_another_size(tmp_path):
    model = cait.compress(small(img_size=64, dynamic_img_size=True), merge=cait.ATME(flops=0.7)).eval()
    done = cait.export(model, tmp_path / "m.pt2", format="pt2", img_size=(80, 96))
    assert done.img_size == (80, 96) and done.error < 1e-5
    images = torch.randn(1, 3, 80, 96)
    with torch.inference_mode():
        assert rel_err(load_exported(done.path)(images), model(images)) < 1e-5
    assert cait.export(model, tmp_path / "n.pt2", format="pt2").img_size == (64, 64)  # the native size by default
    done = cait.export(model, tmp_path / "k.pt2", format="pt2", img_size=np.int64(48), batch=np.int64(2))  # numpy ints too
    assert done.img_size == (48, 48) and done.batch == 2


@pytest.mark.parametrize(
    "img_size, message", [(0, "img_size must be"), ((80,), "img_size must be"), ((80, 80.0), "img_size must be"), (96, "dynamic_img_size")]
)
def test_another_size_is_refused_before_any_work(compressed, img_size, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        cait.export(compressed, tmp_path / "m.pt2", img_size=img_size)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(format="tflite"), ValueError, "format must be one of"),
        (dict(batch=0), ValueError, "batch must be a whole number >= 1"),
        (dict(batch=True), ValueError, "batch must be a whole number >= 1"),
        (dict(dynamic_batch="yes"), TypeError, "dynamic_batch must be True or False"),
        (dict(path="m.onnx"), ValueError, "a pt2 file must end in .pt2"),
        (dict(path="m.aoti.pt2"), ValueError, "a pt2 file must end in .pt2"),
        (dict(format="aoti", path="m.aoti.pt2", dynamic_batch=True), NotImplementedError, "one batch size"),
        (dict(path="/no/such/folder/m.pt2"), FileNotFoundError, "no such folder"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(compressed, kwargs, error, message, tmp_path):
    kwargs = {"path": "m.pt2", **kwargs}
    if not os.path.isabs(kwargs["path"]):
        kwargs["path"] = str(tmp_path / kwargs["path"])
    with pytest.raises(error, match=message):
        cait.export(compressed, **kwargs)
    assert not os.listdir(tmp_path)


def test_a_model_in_training_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="training mode"):
        cait.export(small(depth=1, img_size=64).train(), tmp_path / "m.pt2")


def test_cli_exports_a_saved_model(compressed, tmp_path, capsys):
    saved = tmp_path / "m.safetensors"
    cait.save(compressed, saved)
    assert run(["export", str(saved), "--format", "pt2", "--batch", "2", "--dynamic-batch"]) == 0
    assert (tmp_path / "m.pt2").exists()
    printed = capsys.readouterr().out
    assert "wrote" in printed and "any batch" in printed and "80x80 px" in printed and "relative error" in printed


def test_cli_exports_a_dynamic_size_model_at_another_size(tmp_path, capsys):
    saved = tmp_path / "m.safetensors"
    argv = ["compress", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--merge-flops", "0.8", "--dynamic-img-size"]
    argv += ["--out", str(saved)]
    assert run(argv) == 0 and cait.load(saved).dynamic_img_size
    assert run(["export", str(saved), "--format", "pt2", "--img-size", "96", "80"]) == 0
    assert "96x80 px" in capsys.readouterr().out
    assert load_exported(tmp_path / "m.pt2")(torch.randn(1, 3, 96, 80)).shape == (1, 1000)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--format", "pt2", "--batch", "0"], "batch must be a whole number >= 1"),
        (["--format", "aoti", "--dynamic-batch"], "one batch size"),
        (["--format", "onnx", "--out", "OUT/m.pt2"], "a onnx file must end in .onnx"),
        (["--format", "pt2", "--out", "/no/such/folder/m.pt2"], "no such folder"),
        (["--format", "tflite"], "invalid choice"),
        (["--format", "pt2", "--img-size", "96"], "dynamic_img_size"),
        (["--format", "pt2", "--img-size", "96", "96", "3"], "--img-size takes H or H W"),
    ],
)
def test_cli_errors_are_one_line(compressed, tmp_path, capsys, argv, message):
    saved = tmp_path / "m.safetensors"
    cait.save(compressed, saved)
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    assert run(["export", str(saved), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("cait export: error:")  # argparse prints its usage above choice errors
    assert all("error" not in line for line in err[:-1])
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


@pytest.mark.parametrize(
    "name, content, message",
    [("none.safetensors", None, "no such file"), ("x.safetensors", b"junk", "not a safetensors"), ("folder", "dir", "is a folder")],
)
def test_cli_refuses_what_is_not_a_cait_file(tmp_path, capsys, name, content, message):
    if content == "dir":
        (tmp_path / name).mkdir()
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    assert run(["export", str(tmp_path / name), "--format", "pt2"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
