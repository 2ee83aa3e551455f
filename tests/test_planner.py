"""cait.plan: the search on a tiny model with an injected deterministic timer and clock picks the point a
brute-force search over every candidate picks, honours its budget, reports an unreachable target; the
plan file round-trips and rebuilds the measured model; a short real run on this CPU."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

import cait
from cait.planner import Candidate, FlopsRatio, Latency, Plan, Point, Speedup, generate
from test_cli import run as cli


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=128, depth=4, num_classes=10).eval()


@pytest.fixture(scope="module")
def pool(tiny):
    """A smaller candidate set than the default (the suite's time): every form, two pruning levels."""
    return generate(tiny, prune_levels=(None, (0.5, 0.75, 0.75)), merge_levels=(1.0, 0.7, 0.5, 0.4))


@pytest.fixture(scope="module")
def few(tiny):
    """Fewer still, for the tests of what a plan reports rather than what it picks."""
    return generate(tiny, prune_levels=(None, (0.5, 0.75, 0.75)), merge_levels=(1.0, 0.6, 0.4), forms=(("constant", 0.0, 2),))


@pytest.fixture(scope="module")
def planned(tiny, images, pool):
    """A plan for 1.6x with the fake machine, and that machine."""
    machine = FakeMachine(tiny)
    plan = cait.plan(tiny, images, Speedup(1.6), budget_s=1.0, candidates=pool, timer=machine.timer, clock=machine.clock, progress=False)
    return plan, machine


@pytest.fixture(scope="module")
def images():
    return torch.randn(8, 3, 128, 128, generator=torch.Generator().manual_seed(1))


class FakeMachine:
    """Latency per batch = 1 ms x (0.1 + 0.9 x FLOPs ratio) [+ ``penalty`` for a pruned model]; a clock
    that advances only by the seconds 'timed' (repeats x latency, warm-up included)."""

    def __init__(self, dense, penalty=0.0):
        self.dense_flops, self.dense_params = cait.flops(dense), sum(p.numel() for p in dense.parameters())
        self.penalty, self.now, self.calls, self.known = penalty, 0.0, 0, {}

    def latency(self, model) -> float:
        model = getattr(model, "model", model)  # a compiled runner (cait.Optimized) holds the model it compiled
        params = sum(p.numel() for p in model.parameters())
        key = (getattr(model, "schedule", ()), params)  # what the FLOPs depend on here
        if key not in self.known:
            pruned = params < self.dense_params
            self.known[key] = 1e-3 * (0.1 + 0.9 * cait.flops(model) / self.dense_flops) + (self.penalty if pruned else 0)
        return self.known[key]

    drift = 1.0  # each timing call runs this much faster than the last (a machine whose load changes)

    def timer(self, runners, images, repeats):
        self.calls += 1
        out = {name: [self.latency(model) * self.drift**self.calls] * repeats for name, model in runners.items()}
        self.now += sum(v[0] * (repeats + 1) for v in out.values())
        return out

    def clock(self) -> float:
        return self.now


def brute_force(dense, images, pool, needed: float, machine: FakeMachine):
    """The most faithful candidate (top-1 agreement, then KL, then speed) whose fake speedup meets ``needed``,
    computed directly over every candidate."""
    with torch.no_grad():
        reference = dense(images)
        best = None
        dense_latency = machine.latency(dense)
        for c in pool:
            fast = c.build(dense)
            logits = fast(images)
            agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            kl = (reference.softmax(-1) * (reference.log_softmax(-1) - logits.log_softmax(-1))).sum(-1).mean().item()
            speedup = dense_latency / machine.latency(fast)
            if speedup >= needed and (best is None or (agreement, -kl, speedup) > best[0]):
                best = ((agreement, -kl, speedup), c.key)
    return best[1]


def test_the_search_picks_what_a_brute_force_search_picks(tiny, images, pool, planned):
    plan, machine = planned
    assert plan.chosen == brute_force(tiny, images, pool, 1.6, machine)
    point = plan.point(plan.chosen)
    assert point.speedup >= 1.6 and point.repeats >= 5
    assert plan.spent_s <= plan.budget_s
    assert {p.key for p in plan.front} <= {p.key for p in plan.points if p.speedup is not None}
    assert [p.candidate.label for p in plan.points if p.key in plan.references] == ["recipe", "ToMe"]


def test_the_budget_bounds_the_timing(tiny, images, pool):
    machine = FakeMachine(tiny, penalty=2e-4)
    budget = 0.05  # the dense model alone takes 6 ms at 5 repeats here: a few rungs at most
    plan = cait.plan(tiny, images, Speedup(1.5), budget_s=budget, candidates=pool, timer=machine.timer, clock=machine.clock, progress=False)
    assert plan.spent_s <= budget
    timed = [p for p in plan.points if p.speedup is not None]
    assert 0 < len(timed) < len(plan.points)
    if plan.chosen is not None:
        assert plan.point(plan.chosen).speedup >= 1.5


def test_an_unreachable_target_is_reported_with_the_fastest_point(tiny, images, few):
    machine = FakeMachine(tiny)
    plan = cait.plan(tiny, images, Speedup(50), budget_s=1.0, candidates=few, timer=machine.timer, clock=machine.clock, progress=False)
    assert plan.chosen is None and not plan.reachable
    fastest = plan.point(plan.fastest)
    assert fastest.speedup == max(p.speedup for p in plan.points if p.speedup is not None and p.candidate.method == "cait")
    assert fastest.speedup < 50 and "out of reach" in plan.summary()
    assert fastest.flops_ratio == min(p.flops_ratio for p in plan.points if p.candidate.method == "cait")  # the fast end was timed
    with pytest.raises(ValueError, match="nothing that reaches 50x"):
        plan.compress(tiny)


def test_a_speedup_is_over_the_dense_runs_timed_with_it(tiny, images, few):
    """On a machine that gets faster run after run, a speedup is still the true ratio: each candidate is
    compared with the dense runs interleaved with its own, not with dense runs from other rungs."""
    machine = FakeMachine(tiny)
    machine.drift = 0.7
    plan = cait.plan(tiny, images, Speedup(1.3), budget_s=1.0, candidates=few, timer=machine.timer, clock=machine.clock, progress=False)
    timed = [p for p in plan.points if p.speedup is not None]
    assert len(timed) > 2
    for p in timed:
        assert p.speedup == pytest.approx(machine.latency(tiny) / machine.latency(p.candidate.build(tiny)), rel=1e-9)


def test_latency_and_flops_targets(tiny, images, few):
    machine = FakeMachine(tiny)
    plan = cait.plan(tiny, images, Latency(ms=0.7), budget_s=1.0, candidates=few, timer=machine.timer, clock=machine.clock, progress=False)
    assert plan.point(plan.chosen).latency_s <= 0.7e-3
    machine = FakeMachine(tiny)
    plan = cait.plan(tiny, images, FlopsRatio(0.5), budget_s=1.0, candidates=few, timer=machine.timer, clock=machine.clock, progress=False)
    assert plan.point(plan.chosen).flops_ratio <= 0.5


def test_the_plan_file_round_trips_and_rebuilds_the_measured_model(tiny, images, planned, tmp_path):
    plan, _ = planned
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.to_json() == plan.to_json() == json.loads((tmp_path / "plan.json").read_text())
    fast = again.compress(tiny)
    point = plan.point(plan.chosen)
    assert fast.schedule == point.candidate.schedule or not any(point.candidate.schedule)
    assert cait.flops(fast) / cait.flops(tiny) == pytest.approx(point.flops_ratio)
    with torch.no_grad():
        agreement = (fast(images).argmax(-1) == tiny(images).argmax(-1)).float().mean().item()
        assert torch.equal(fast(images), point.candidate.build(tiny)(images))
    assert agreement == point.fidelity["agreement"]
    other = timm.create_model("deit_tiny_patch16_224", img_size=160, depth=4, num_classes=10)
    with pytest.raises(ValueError, match="made for deit_tiny_patch16_224 on \\(3, 128, 128\\)"):
        again.compress(other)


def test_a_backbone_is_planned_on_its_grid_features(images):
    backbone = timm.create_model("deit_tiny_patch16_224", img_size=128, depth=4, num_classes=0).eval()
    machine = FakeMachine(backbone)
    pool = generate(backbone, prune_levels=(None, (0.5, 0.75, 0.75)), merge_levels=(1.0, 0.7, 0.5), forms=(("constant", 0.0, 2),))
    plan = cait.plan(backbone, images, Speedup(1.4), budget_s=1.0, candidates=pool, timer=machine.timer, clock=machine.clock,
                     progress=False)  # fmt: skip
    point = plan.point(plan.chosen)
    fast = point.candidate.build(backbone)
    with torch.no_grad():
        expected = F.cosine_similarity(fast.forward_dense(images), cait.compress(backbone).forward_dense(images), dim=1).mean().item()
    assert point.fidelity["cosine"] == pytest.approx(expected, abs=1e-5)


def test_labels_make_the_score_accuracy(tiny, images):
    machine = FakeMachine(tiny)
    labels = torch.arange(len(images)) % 10
    candidates = [Candidate(), Candidate(merge_flops=0.6, schedule=(20, 10, 5, 0))]
    plan = cait.plan(tiny, images, Speedup(1.0), labels=labels, candidates=candidates, references=False, budget_s=1.0,
                     timer=machine.timer, clock=machine.clock, progress=False)  # fmt: skip
    with torch.no_grad():
        for p in plan.points:
            expected = (p.candidate.build(tiny)(images).argmax(-1) == labels).float().mean().item()
            assert p.fidelity["top1"] == p.fidelity["score"] == expected


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(target=1.9), "target must be"),
        (dict(runtime="tensorrt"), "runtime must be one of"),
        (dict(batch=0), "batch must be"),
        (dict(images=torch.randn(4, 3, 64, 64)), "calibration images"),
        (dict(labels=torch.zeros(3)), "labels must be"),
        (dict(budget_s=0), "budget_s must be"),
        (dict(runtime="cuda graph"), "needs a CUDA device"),
        (dict(budget_s=float("inf")), "finite"),
        (dict(candidates=[]), "non-empty list"),
        (dict(candidates=["merge=0.7"]), "non-empty list"),
        (dict(candidates=[Candidate(schedule=(4, 0, 0, 0), merge_flops=0.9), Candidate(schedule=(0, 4, 0, 0), merge_flops=0.9)]),
         "share the name"),
        (dict(labels=torch.zeros(8)), "integer class indices"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tiny, images, kwargs, error):
    machine = FakeMachine(tiny)
    args = dict(images=images, target=Speedup(1.5), timer=machine.timer, clock=machine.clock, progress=False) | kwargs
    with pytest.raises((ValueError, TypeError), match=error):
        cait.plan(tiny, **args)
    assert machine.calls == 0


def test_targets_refuse_nonsense():
    nan, inf = float("nan"), float("inf")
    for make in (lambda: Speedup(0), lambda: Latency(ms=-1), lambda: FlopsRatio(1.5), lambda: Speedup(True), lambda: Speedup(nan),
                 lambda: Latency(ms=inf), lambda: Candidate(method="foo")):  # fmt: skip
        with pytest.raises(ValueError):
            make()


def test_a_short_real_run_on_this_cpu(tiny, images, tmp_path):
    """Real timing (no assertion on speed): a plan comes back with timed points and a cache that a second run reuses.
    One candidate: with more, which ones the first run times depends on its (real) timings, and a second
    run, which starts from all of them, may rightly time fewer."""
    cache = tmp_path / "timings.json"
    candidates = [Candidate(merge_flops=0.5, schedule=(30, 10, 0, 0))]
    plan = cait.plan(tiny, images, Speedup(1.2), batch=2, budget_s=300, candidates=candidates, repeats=2, cache=str(cache), progress=False)
    timed = [p for p in plan.points if p.speedup is not None]
    assert {p.candidate.label for p in timed} >= {"recipe", "ToMe"} and all(p.speedup > 0 and p.repeats >= 2 for p in timed)
    plan.plot(str(tmp_path / "plan.png"))
    assert (tmp_path / "plan.png").stat().st_size > 0
    (context,) = json.loads(cache.read_text()).values()
    # a configuration's key, then a digest of what it is
    names = {k.split(" #")[0] + (" | dense" if k.endswith(" | dense") else "") for k in context}
    assert names == {"dense", *(p.key for p in timed), *(f"{p.key} | dense" for p in timed)}

    def no_timing(*args):
        raise AssertionError("everything was in the cache")

    again = cait.plan(tiny, images, Speedup(1.2), batch=2, budget_s=300, candidates=candidates, repeats=2, cache=str(cache),
                      timer=no_timing, progress=False)  # fmt: skip
    assert [(p.key, p.latency_s) for p in again.points] == [(p.key, p.latency_s) for p in plan.points]


def test_the_command_line_plans_compresses_by_the_plan_and_says_where_it_came_from(tmp_path, capsys):
    plan_file, model_file = tmp_path / "plan.json", tmp_path / "planned.safetensors"
    model = ["--model", "deit_tiny_patch16_224", "--img-size", "64", "--num-classes", "10"]
    assert cli(["plan", *model, "--target-flops", "0.8", "--budget", "20", "--no-cache", "--out", str(plan_file)]) == 0
    out = capsys.readouterr().out
    assert "chosen" in out and (tmp_path / "plan.png").stat().st_size > 0
    plan = Plan.load(plan_file)
    assert plan.point(plan.chosen).flops_ratio <= 0.8
    assert cli(["compress", "--plan", str(plan_file), "--num-classes", "10", "--out", str(model_file)]) == 0
    fast = cait.load(model_file)
    assert fast.origin["plan"] == str(plan_file) and fast.schedule == (plan.candidate.schedule or fast.schedule)
    assert cait.flops(fast) / plan.dense_gflops / 1e9 == pytest.approx(plan.point(plan.chosen).flops_ratio)
    capsys.readouterr()
    assert cli(["info", str(model_file)]) == 0
    assert f"plan: {plan_file}" in capsys.readouterr().out


def made_plan(target, chosen: bool) -> Plan:
    point = Point(Candidate(prune=(0.5, 0.75, 0.75)), 0.7, 0.1, {"score": 0.9}, latency_s=1e-3, speedup=1.6, repeats=5)
    return Plan(target, "eager", 1, "cpu", "float32", "deit_tiny_patch16_224", (3, 64, 64), {"cpu": "x"}, 1e-3, 0.1,
                [point], chosen=point.key if chosen else None, fastest=point.key)  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--keep-qk", "0.5"], "--plan fixes the configuration it measured: drop --keep-qk"),
        (["--model", "deit_small_patch16_224"], "was made for deit_tiny_patch16_224, not --model deit_small_patch16_224"),
        (["--img-size", "96"], "was made for 64x64 images"),
    ],
)
def test_compress_by_a_plan_refuses_flags_that_would_change_it(tmp_path, capsys, extra, message):
    made_plan(Speedup(1.5), chosen=True).save(tmp_path / "plan.json")
    assert cli(["compress", "--plan", str(tmp_path / "plan.json"), *extra, "--out", str(tmp_path / "m.safetensors")]) == 2
    assert message in capsys.readouterr().err


def test_a_plan_that_reached_nothing_or_a_file_that_is_no_plan_is_refused(tmp_path, capsys):
    made_plan(Speedup(50), chosen=False).save(tmp_path / "plan.json")
    (tmp_path / "other.json").write_text('{"format": 7}')
    for path, message in ((tmp_path / "plan.json", "found nothing that reaches 50x"), (tmp_path / "other.json", "not a cait plan")):
        assert cli(["compress", "--plan", str(path), "--out", str(tmp_path / "m.safetensors")]) == 2
        assert message in capsys.readouterr().err


def test_the_compiled_runtime_takes_more_candidates_than_dynamo_s_default_limit(images):
    """Each compiled candidate is another entry of one code object: more than 8 (dynamo's default
    limit) stopped the search with FailOnRecompileLimitHit."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2, num_classes=10).eval()
    candidates = [Candidate(schedule=(r, 0), merge_flops=1 - r / 20) for r in range(1, 11)]
    machine = FakeMachine(model)
    plan = cait.plan(model, torch.randn(2, 3, 64, 64), FlopsRatio(0.99), runtime="compile", candidates=candidates, budget_s=100.0,
                     timer=machine.timer, clock=machine.clock, progress=False)  # fmt: skip
    assert sum(p.speedup is not None for p in plan.points) > 8 and len(plan.references) == 2  # a first rung of 8, then the references


def test_a_plan_refuses_another_build_of_its_model_and_files_that_are_no_plans(tiny, planned, tmp_path):
    plan, _ = planned
    narrower = timm.create_model("deit_tiny_patch16_224", img_size=128, depth=4, num_classes=10, embed_dim=96, num_heads=3)
    with pytest.raises(ValueError, match="built with other settings"):
        plan.compress(narrower)
    with pytest.raises(KeyError, match="no point 'nope'"):
        plan.point("nope")
    (tmp_path / "x.png").write_bytes(b"\x89PNG\xff\xfe")
    for path in (tmp_path / "x.png", tmp_path):
        with pytest.raises(ValueError, match="not a cait plan|is a folder"):
            Plan.load(path)
    assert cait.planner.generate is generate  # the sub-module is public


class NoisyMachine(FakeMachine):
    """The fake machine with run-to-run noise: run ``i`` of a call takes ``1 + 0.07 * ((3 * i + name length) % 5)``
    times its latency; every (dense, configuration) pair of runs is kept to check the spread against."""

    def __init__(self, dense):
        super().__init__(dense)
        self.pairs = {}

    def timer(self, runners, images, repeats):
        self.calls += 1
        out = {n: [self.latency(m) * (1 + 0.07 * ((3 * i + len(n)) % 5)) for i in range(repeats)] for n, m in runners.items()}
        self.now += sum(sum(v) for v in out.values())
        for name in out:
            if name != "dense":
                self.pairs.setdefault(name, []).extend(zip(out["dense"], out[name]))
        return out


def test_the_speedup_spread_is_the_quartiles_of_the_per_run_speedups(tiny, images, few):
    import statistics

    machine = NoisyMachine(tiny)
    plan = cait.plan(tiny, images, Speedup(1.3), budget_s=1.0, candidates=few, timer=machine.timer, clock=machine.clock, progress=False)
    timed = [p for p in plan.points if p.speedup is not None]
    assert len(timed) > 2
    for p in timed:
        ratios = [d / own for d, own in machine.pairs[p.key]]
        low, _, high = statistics.quantiles(ratios, n=4)
        assert p.speedup_iqr == pytest.approx((low, high), rel=1e-12) and low < high
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert [p.speedup_iqr for p in again.points] == [p.speedup_iqr for p in plan.points]
    assert "| IQR |" in plan.table()


def test_the_plan_benchmark_compares_with_the_recipe_at_its_speed(planned):
    from cait.planner.benchmark import compare

    plan, _ = planned
    row = compare(plan)
    recipe = plan.point(next(k for k in plan.references if plan.point(k).candidate.label == "recipe"))
    assert row["recipe"]["configuration"] == recipe.key and row["recipe"]["speedup"] == recipe.speedup
    assert row["chosen"]["configuration"] == plan.chosen and row["reachable"]
    as_fast = [p for p in plan.points if p.speedup is not None and p.key not in plan.references and p.speedup >= recipe.speedup]
    best = max(as_fast, key=lambda p: (p.fidelity["agreement"], -p.fidelity["kl"], p.speedup))
    assert row["planned_at_recipe_speed"]["configuration"] == best.key


def test_the_plan_benchmark_plans_a_setting_and_writes_its_plan(tmp_path):
    from cait.planner import benchmark

    setting = benchmark.Setting("deit_tiny_patch16_224", 1, "eager", 1, 1.5)
    threads = torch.get_num_threads()
    (row,) = benchmark.run([setting], budget_s=4, folder=str(tmp_path), calibration=4)
    assert torch.get_num_threads() == threads  # restored
    assert Plan.load(tmp_path / f"{setting.name}.json").batch == 1 and (tmp_path / f"{setting.name}.png").stat().st_size > 0
    assert row["model"] == setting.model and row["target"] == 1.5 and row["dense_ms"] > 0
    point = row["chosen"] if row["reachable"] else row["fastest"]
    if point is None:  # a loaded machine spent the 4 s on the references: the row says so instead of a point
        assert "nothing timed: raise --budget" in benchmark.table([row])
    else:
        assert point["speedup"] > 0
    assert setting.model in benchmark.table([row])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variant", "merge=0.5"], "--plan runs on its own"),
        (["--batch", "4"], "drop --batch"),
        (["--models", "vit_base_patch16_224"], "names none of them"),
        (["--budget", "0"], "--budget must be positive"),
        (["--accuracy", "--models", "deit_tiny_patch16_224"], "drop --models"),
        (["--segmentation", "--models", "deit_tiny_patch16_224"], "drop --models"),
        (["--segmentation", "--accuracy"], "not both"),
        (["--threads", "1"], "--threads only with --accuracy/--segmentation"),
        (["--segmentation", "--seeds", "0"], "--seeds, --epochs and --finetune-epochs must be at least 1"),
    ],
)
def test_bench_plan_refuses_what_it_would_not_use(extra, message, capsys):
    assert cli(["bench", "--plan", *extra]) != 0
    assert message in capsys.readouterr().err


def test_a_budget_without_plan_is_refused(capsys):
    assert cli(["bench", "--budget", "10"]) != 0
    assert "it needs --plan" in capsys.readouterr().err


def test_the_digits_comparison_scores_the_recipe_and_the_plan_at_its_speed(monkeypatch):
    """A short run on a slice of the digits: every row has the recipe's and (when one was measured as
    fast) the planned point's top-1 values, each in [0, 1], and the planned point is at least as fast."""
    from cait.benchmarks import accuracy
    from cait.planner import benchmark

    full = accuracy.digits
    monkeypatch.setattr(accuracy, "digits", lambda seed: tuple(t[:n] for t, n in zip(full(seed), (192, 192, 100, 100))))
    (row,) = benchmark.digits(seeds=(0,), epochs=1, finetune_epochs=1, budget_s=6, calibration=32)
    values = [row[k] for k in row if k.endswith("top1")]
    assert {"dense_top1", "recipe_one_shot_top1", "recipe_fine_tuned_top1"} <= set(row) and all(0 <= v <= 1 for v in values)
    if row["planned_at_recipe_speed"] is not None:
        assert row["planned_at_recipe_speed"]["speedup"] >= row["recipe"]["speedup"] and "planned_fine_tuned_top1" in row
    assert "recipe:" in benchmark.digits_table([row])


def test_a_segmentation_model_is_planned_on_its_masks(images, tmp_path):
    """A Segmenter plans on its backbone; fidelity is the pixel agreement of the predicted masks and,
    with masks given, the mIoU; both recomputed here from the rebuilt model's logits."""
    from cait import segmentation

    torch.manual_seed(0)
    backbone = timm.create_model("deit_tiny_patch16_224", img_size=128, depth=4).eval()
    dense = segmentation.segmenter(backbone, 5).eval()
    masks = torch.randint(0, 5, (len(images), 128, 128), generator=torch.Generator().manual_seed(2))
    masks[:, :4] = segmentation.IGNORE
    machine = FakeMachine(dense)
    pool = generate(dense, prune_levels=(None, (0.5, 0.75, 0.75)), merge_levels=(1.0, 0.7, 0.5), forms=(("constant", 0.0, 2),))
    plan = cait.plan(dense, images, Speedup(1.3), labels=masks, budget_s=1.0, candidates=pool, timer=machine.timer,
                     clock=machine.clock, progress=False)  # fmt: skip
    assert plan.model == "Segmenter(deit_tiny_patch16_224)" and plan.reachable
    plan.save(tmp_path / "plan.json")
    fast = Plan.load(tmp_path / "plan.json").compress(dense)
    assert isinstance(fast, segmentation.Segmenter) and fast.head is not dense.head and fast.backbone.origin["target"].startswith("1.3x")
    point = plan.point(plan.chosen)
    with torch.no_grad():
        logits, reference = fast(images), dense(images)
    assert point.fidelity["agreement"] == pytest.approx((logits.argmax(1) == reference.argmax(1)).float().mean().item(), abs=1e-7)
    assert point.fidelity["miou"] == point.fidelity["score"] == pytest.approx(
        segmentation.scores(segmentation.confusion(logits, masks, 5))["miou"], abs=1e-12
    )
    assert cait.flops(fast) / cait.flops(dense) == pytest.approx(point.flops_ratio)
    with pytest.raises(ValueError, match="masks"):
        cait.plan(dense, images, Speedup(1.3), labels=torch.zeros(len(images), dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="not a compressed one"):
        cait.plan(fast, images, Speedup(1.3), progress=False)


def test_the_segmentation_comparison_fine_tunes_the_planned_choice(monkeypatch, tmp_path):
    """A short run on a few canvases: the row has dense's and (when the plan reached its target) the
    planned model's test mIoU and measured speedup, and the trained models land in the run folder."""
    from cait.benchmarks import segmentation as bench
    from cait.planner import benchmark

    canvases, validation = bench.canvases, bench.validation
    monkeypatch.setattr(bench, "canvases", lambda seed: tuple(t[:n] for t, n in zip(canvases(seed), (128, 128, 64, 64))))
    monkeypatch.setattr(bench, "validation", lambda seed: tuple(t[:64] for t in validation(seed)))
    (row,) = benchmark.segmentation(seeds=(0,), epochs=1, finetune_epochs=1, target=1.05, budget_s=6, folder=str(tmp_path), repeats=2)
    assert 0 <= row["dense_miou"] <= 1 and (tmp_path / "seed0").is_dir()
    if row["reachable"]:
        assert 0 <= row["planned_miou"] <= 1 and row["planned_speedup"] > 0 and "miou" in row["chosen"]
    assert "dense mIoU" in benchmark.segmentation_table([row])


def test_another_measured_point_can_be_built_from_a_plan(tiny, images, planned, tmp_path, capsys):
    plan, _ = planned
    other = next(p for p in plan.points if p.speedup is not None and p.key != plan.chosen and p.candidate.method == "cait")
    fast = plan.compress(tiny, point=other.key)
    with torch.no_grad():
        assert torch.equal(fast(images), other.candidate.build(tiny)(images))
    assert fast.origin["point (not the plan's choice)"].startswith(other.key) and "chosen" not in fast.origin
    with pytest.raises(ValueError, match="has no point 'merge=0.123'.*Pareto front: "):
        plan.compress(tiny, point="merge=0.123")
    tome = next(k for k in plan.references if plan.point(k).candidate.method == "tome")
    with pytest.raises(ValueError, match="ToMe reference"):
        plan.compress(tiny, point=tome)
    unreachable = made_plan(Speedup(50), chosen=False)  # its fastest point can still be built by name
    unreachable.save(tmp_path / "plan.json")
    out = tmp_path / "m.safetensors"
    point = unreachable.fastest
    args = ["compress", "--plan", str(tmp_path / "plan.json"), "--out", str(out)]
    assert cli([*args, "--plan-point", point]) == 0
    assert cait.load(out).origin["point (not the plan's choice)"].startswith(point)
    assert cli(["compress", "--model", "deit_tiny_patch16_224", "--merge-flops", "0.8", "--plan-point", point, "--out", str(out)]) == 2
    assert "it needs --plan FILE" in capsys.readouterr().err


def test_slow_setups_of_candidates_count_against_the_budget(tiny, images, pool, monkeypatch):
    """A runtime whose compressed models take far longer to get ready than dense (an ONNX export that
    grows with the merge steps): the search plans with the slowest setup seen and stays in budget."""
    from cait.planner import search

    machine = FakeMachine(tiny)
    real = search.prepare

    def slow_prepare(model, *args):
        machine.now += 0.02 if model is not None and hasattr(model, "schedule") else 0.001  # 20 ms per candidate, 1 ms for dense
        return real(model, *args)

    monkeypatch.setattr(search, "prepare", slow_prepare)
    budget = 0.15
    plan = cait.plan(tiny, images, Speedup(1.5), budget_s=budget, candidates=pool, timer=machine.timer, clock=machine.clock, progress=False)
    assert plan.spent_s <= budget
    assert 0 < sum(p.speedup is not None for p in plan.points) < 8  # at most what the budget affords at 20 ms each
    assert plan.references  # their share was kept, at the slowest setup seen (not dense's 1 ms)


def test_the_timing_cache_tells_configurations_of_one_name_apart(tiny, images, tmp_path):
    """Keys name a schedule's form: two configurations with one key but other counts must not share timings."""
    cache = str(tmp_path / "timings.json")
    first = Candidate(merge_flops=0.6, schedule=(30, 10, 0, 0))
    other = Candidate(merge_flops=0.6, schedule=(1, 0, 0, 0))
    assert first.key == other.key
    kwargs = dict(batch=2, budget_s=60, references=False, repeats=2, cache=cache, progress=False)
    cait.plan(tiny, images, Speedup(1.1), candidates=[first], **kwargs)
    timed = []

    def record(runners, images, repeats):
        timed.append(set(runners))
        return {name: [1e-3 if name == "dense" else 5e-4] * repeats for name in runners}

    again = cait.plan(tiny, images, Speedup(1.1), batch=2, budget_s=60, candidates=[other], references=False, repeats=2, cache=cache,
                      timer=record, progress=False)  # fmt: skip
    assert any(other.key in names for names in timed) and again.point(other.key).speedup == pytest.approx(2.0)


def test_a_fake_machine_plan_with_references_stays_in_budget(tiny, images):
    """The references are timed with as many runs as the budget affords (they ran at the most-timed
    point's count whatever was left, and overran)."""
    now = [0.0]

    def timer(runners, images, repeats):  # dense 10 ms, the candidates 5 to 7 ms
        out = {k: [0.01 if k == "dense" else 0.01 * (0.5 + 0.05 * i)] * repeats for i, k in enumerate(runners)}
        now[0] += len(runners) * (repeats + 1) * 0.01
        return out

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=4).eval()
    cands, calibration = generate(model)[:40], torch.randn(4, 3, 64, 64)
    for budget in (5.0, 20.0):
        now[0] = 0.0
        plan = cait.plan(model, calibration, Speedup(1.2), batch=2, budget_s=budget, candidates=cands, timer=timer,
                         clock=lambda: now[0], progress=False)  # fmt: skip
        assert plan.spent_s <= budget and plan.references


def test_candidates_and_labels_are_checked_before_any_work(tiny, images):
    def refused(match, **kwargs):
        with pytest.raises(ValueError, match=match):
            cait.plan(tiny, images, Speedup(1.5), timer=no_timer, progress=False, **kwargs)

    def no_timer(*args):
        raise AssertionError("timed before refusing")

    refused("has no schedule", candidates=[Candidate(merge_flops=0.5)])
    refused("merges in 2 blocks; the model has 4", candidates=[Candidate(schedule=(1, 1), merge_flops=0.9)])
    refused("keep ratio", candidates=[Candidate(prune=(1.5, 0.5, 0.5))])
    refused("class indices in \\[0, 10\\)", labels=torch.full((len(images),), 5000))
    refused("class indices in \\[0, 10\\)", labels=torch.full((len(images),), -1))
    refused("budget_s", budget_s=True)


def test_no_plan_chooses_the_uncompressed_model(tiny, images):
    assert all(any(c.schedule) or c.prune for c in generate(tiny))
    machine = FakeMachine(tiny)
    identity = Candidate()
    pruned = Candidate(prune=(0.5, 0.75, 0.75))
    plan = cait.plan(tiny, images, Speedup(0.5), budget_s=1.0, candidates=[identity, pruned], timer=machine.timer, clock=machine.clock,
                     progress=False)  # fmt: skip
    assert plan.chosen == pruned.key  # the identity is more faithful (1.0) and meets 0.5x, but is no compression


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(chosen="merge=0.123"),
        lambda d: d["points"][0].update(fidelity={}),
        lambda d: d.update(input_size=[3, 64]),
        lambda d: d.update(points="x"),
        lambda d: d["points"][0]["candidate"].update(prune=[0.25, 0.75, 0.75]),  # the chosen key then names no point
    ],
)
def test_a_plan_file_whose_parts_disagree_is_refused_in_one_line(edit, tmp_path, capsys):
    data = made_plan(Speedup(1.5), chosen=True).to_json()
    edit(data)
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is not a complete cait plan"):
        Plan.load(tmp_path / "plan.json")
    assert cli(["compress", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "is not a complete cait plan" in capsys.readouterr().err


def test_the_cli_refuses_a_segmentation_plan_and_a_model_that_is_no_vit(tmp_path, capsys):
    plan = made_plan(Speedup(1.5), chosen=True)
    plan.model = "Segmenter(deit_tiny_patch16_224)"
    plan.save(tmp_path / "plan.json")
    assert cli(["compress", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "is for a segmentation model: build it in Python" in capsys.readouterr().err
    assert cli(["compress", "--model", "resnet18", "--img-size", "64", "--merge-r", "2", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "resnet18 cannot be built with --img-size" in capsys.readouterr().err


def test_the_bench_table_says_when_nothing_was_timed():
    from cait.planner import benchmark

    row = {"model": "m", "batch": 1, "runtime": "compile", "threads": 1, "target": 1.9, "reachable": False, "chosen": None,
           "fastest": None, "recipe": None, "tome": None, "planned_at_recipe_speed": None}  # fmt: skip
    assert "nothing timed: raise --budget" in benchmark.table([row]) and "out of reach" not in benchmark.table([row])


def test_the_plot_names_the_score_it_draws():
    from cait.planner.result import _metric_name

    assert _metric_name({"score": 1, "miou": 1}, "Segmenter(x)") == "mIoU (given masks)"
    assert _metric_name({"score": 1, "agreement": 1}, "Segmenter(x)") == "pixel agreement with dense"
    assert _metric_name({"score": 1, "top1": 1, "agreement": 1}, "deit") == "top-1 accuracy (given labels)"
    assert _metric_name({"score": 1, "cosine": 1}, "deit") == "cosine of grid features with dense"
