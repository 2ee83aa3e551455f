"""The public surface: every name in ``cait.__all__`` resolves, every command's ``--help`` works, and
the layers import only downwards (kernels never import the method, the method never the CLI)."""

import ast
import pathlib
import subprocess
import sys

import pytest

import cait
import cait_kernels
from cait.cli import COMMANDS, build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", cait.__all__)
def test_every_public_name_resolves(name):
    assert getattr(cait, name) is not None
    assert name in dir(cait)


@pytest.mark.parametrize("name", cait_kernels.__all__)
def test_every_kernel_name_resolves(name):
    assert callable(getattr(cait_kernels, name))


def test_public_names_are_not_shadowed_by_submodules():
    """Importing every sub-module first (as other code may) must not turn a public function into a module."""
    code = (
        "import importlib, pkgutil, types, cait\n"
        "for info in pkgutil.walk_packages(cait.__path__, 'cait.'):\n"
        "    if info.name != 'cait.__main__':\n"
        "        importlib.import_module(info.name)\n"
        "print([n for n in cait._NAMES if isinstance(getattr(cait, n), types.ModuleType)])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        cait.nothing_here  # noqa: B018


def test_public_modules_keep_their_names():
    assert callable(cait.finetune.make_student) and callable(cait.finetune.train_epoch)
    assert callable(cait.segmentation.segmenter) and callable(cait.segmentation.evaluate)


@pytest.mark.parametrize("command", [m.__name__.rsplit(".", 1)[1] for m in COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([command, "--help"])
    assert stop.value.code == 0
    assert f"usage: cait {command}" in capsys.readouterr().out


def test_help_does_not_import_torch():
    """``cait --help`` parses arguments only: torch, timm and the kernels load when a command runs."""
    code = (
        "import sys; from cait.cli import main\n"
        "try: main(['--help'])\n"
        "except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'timm', 'cait_kernels') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


def test_transformers_is_optional_and_lazy():
    """``import cait``, ``cait --help``, timm compression, save and load never import transformers (``cait[hf]``)."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # as if not installed: any import of it fails
        "import timm, torch, cait\n"
        "from cait.cli import main\n"
        "try: main(['--help'])\n"
        "except SystemExit: pass\n"
        "m = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1, num_classes=3)\n"
        "fast = cait.compress(m, merge=cait.ATME(r=1)); import cait.hf\n"
        "import tempfile, os; path = os.path.join(tempfile.mkdtemp(), 'm.safetensors'); cait.save(fast, path); cait.load(path)\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("ok"), out
    code = "import sys, cait, cait.cli; cait.cli.build_parser(); print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", out


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module)
    return found


LAYERS = {  # a package -> the packages it must not import
    "cait_kernels": ("cait.", "timm"),
    "cait.train": ("cait.cli", "cait.benchmarks"),
    "cait.segmentation": ("cait.cli", "cait.benchmarks", "cait.planner"),
    "cait.baselines": ("cait.cli", "cait.benchmarks", "cait.train", "cait.segmentation"),
    "cait.benchmarks": ("cait.cli", "cait.planner"),
    "cait.planner": ("cait.cli", "cait.train"),  # times with the benchmarks' code, ToMe as a reference; plans Segmenters
}


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_layers_import_downwards(package):
    folder = ROOT.joinpath(*package.split("."))
    for path in folder.rglob("*.py"):
        for module in _imports(path):
            for banned in LAYERS[package]:
                assert not (module + ".").startswith(banned) and module != banned.rstrip("."), f"{path.relative_to(ROOT)} imports {module}"


def test_method_modules_do_not_import_upper_layers():
    upper = ("cait.cli", "cait.benchmarks", "cait.baselines", "cait.train")
    for path in (ROOT / "cait").glob("*.py"):
        if path.name == "__main__.py":  # `python -m cait` runs the CLI
            continue
        for module in _imports(path):
            assert not module.startswith(upper), f"{path.name} imports {module}"
