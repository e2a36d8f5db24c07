"""The mutation suite (issue 7): every planted bug of tests/emu_mutants.py must be caught by at least
one CI pass (plain emulator in either fiber order: misuse error or wrong result; ASan/UBSan; TSan
strict), and its correct twin by none. The passes run in child processes (see emu_mutants.run_pass);
the caught/silent table is printed (pytest -s) and written to $MOKERNELS_MUTANTS_TABLE when set."""
from __future__ import annotations

import os

import pytest

import emu_mutants as M
from mokernels._ext import emulation_built

pytestmark = pytest.mark.mutants

BUILDS = {"plain-rev": emulation_built(), "plain-fwd": emulation_built(),
          "asan": emulation_built(sanitized=True), "tsan": emulation_built(tsan=True)}
FEATURES = M.shim_features()


def _runnable(m: M.Mutant) -> bool:
    return m.needs is None or FEATURES[m.needs]


@pytest.fixture(scope="module")
def table():
    missing = [p for p, ok in BUILDS.items() if not ok]
    if missing:
        msg = f"emulation builds missing for passes {missing} (MOKERNELS_BUILD_EMU_ASAN=1 MOKERNELS_BUILD_EMU_TSAN=1)"
        if os.environ.get("MOKERNELS_REQUIRE_EMU") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    cases = [c for m in M.MUTANTS if _runnable(m) for c in (m.name, m.name + ":clean")]
    results = {p: M.run_pass(p, cases) for p in M.PASSES}
    text = M.markdown_table(results, FEATURES)
    print("\n" + text)
    if os.environ.get("MOKERNELS_MUTANTS_TABLE"):
        with open(os.environ["MOKERNELS_MUTANTS_TABLE"], "w") as f:
            f.write(text + "\n")
    return results


@pytest.mark.parametrize("mutant", M.MUTANTS, ids=[m.name for m in M.MUTANTS])
def test_mutant_is_caught(table, mutant):
    if not _runnable(mutant):
        pytest.skip(f"needs issue7-shim ({mutant.needs})")
    outcomes = {p: table[p][mutant.name] for p in M.PASSES}
    assert any(M.caught(o) for o in outcomes.values()), f"{mutant.name} ({mutant.bug}) is silent in every pass"


@pytest.mark.parametrize("mutant", M.MUTANTS, ids=[m.name for m in M.MUTANTS])
def test_correct_twin_is_clean(table, mutant):
    if not _runnable(mutant):
        pytest.skip(f"needs issue7-shim ({mutant.needs})")
    outcomes = {p: table[p][mutant.name + ":clean"] for p in M.PASSES}
    assert not any(M.caught(o) for o in outcomes.values()), outcomes
