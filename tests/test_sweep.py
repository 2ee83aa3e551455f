"""Every timm ViT-family name works or is refused (tests/sweep.py): by default one name per distinct
architecture; ``pytest -m sweep tests/test_sweep.py -s`` checks every name and prints the counts."""
import pytest

import sweep


def _check(selected, total, capsys):
    outcomes = sweep.run(selected)
    with capsys.disabled():
        print("\n" + sweep.table(outcomes, total))
    failures = [f"{o.name}: {o.reason}" for o in outcomes if o.kind == "FAIL"]
    assert not failures, "\n".join(failures)
    assert any(o.kind == "works" for o in outcomes) and any(o.kind == "refused" for o in outcomes)


def test_one_name_per_architecture_works_or_is_refused(capsys):
    every = sweep.names()
    _check(sweep.representatives(every), len(every), capsys)


@pytest.mark.sweep
def test_every_name_works_or_is_refused(capsys):
    every = sweep.names()
    _check(every, len(every), capsys)
