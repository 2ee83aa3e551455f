"""pytest-benchmark entry points (outside the default test run):

    pytest bench/ --benchmark-only [--benchmark-save=NAME | --benchmark-compare]

One group per (model, batch), one benchmark per variant, so comparisons across commits line up.
"""
import pytest
import timm
import torch

import cait
from cait.benchmarks.latency import DEFAULT_VARIANTS, build_variant, parse_variant

CASES = [("deit_small_patch16_224", 8), ("deit_tiny_patch16_224", 1)]


@pytest.mark.parametrize("variant", ["dense", *DEFAULT_VARIANTS, "tome=0.6"])
@pytest.mark.parametrize("name, batch", CASES)
def test_forward(benchmark, name, batch, variant):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    if variant != "dense":
        model = build_variant(model, parse_variant(variant))
    images = torch.randn(batch, 3, 224, 224)
    benchmark.group = f"{name} batch {batch}"
    benchmark.extra_info["gflops"] = cait.flops(model) / 1e9
    with torch.inference_mode():
        benchmark.pedantic(model, args=(images,), rounds=5, warmup_rounds=1)
