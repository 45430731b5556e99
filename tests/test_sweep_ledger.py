"""The sweep ledger: admission control keeps the sum of trial costs within the sweep budget, with
several processes sharing the file and across a SIGKILL. No training: plain numbers."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from budgets.ledger import SweepLedger, TrialRecord, TrialState

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

RUNNING, PAUSED = TrialState.RUNNING, TrialState.PAUSED
SETTLE_STATES = [PAUSED, TrialState.DONE, TrialState.CONVERGED, TrialState.PRUNED, "FAILED"]


def committed(trials: dict[str, TrialRecord]) -> int:
    """The invariant's left side, computed here rather than by the ledger."""
    return sum(t.cost for t in trials.values()) + sum(
        t.limit - t.cost for t in trials.values() if t.state is RUNNING
    )


def assert_invariant(ledger: SweepLedger) -> None:
    trials = ledger.trials()
    assert committed(trials) <= ledger.budget
    assert ledger.available() == ledger.budget - committed(trials)
    assert ledger.spent() == sum(t.cost for t in trials.values())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.json"


def test_admission_refuses_what_does_not_fit_and_admits_after_a_settle(path: Path) -> None:
    ledger = SweepLedger.create(path, 20)
    assert ledger.admit("a", 15)
    before = path.read_bytes()
    assert not ledger.admit("b", 10)
    assert path.read_bytes() == before and "b" not in ledger.trials()
    settled = ledger.settle("a", 8, TrialState.PRUNED)  # 7 of the grant return to the pool
    assert settled == TrialRecord(15, 8, TrialState.PRUNED)
    assert ledger.available() == 12
    assert ledger.admit("b", 10)
    assert ledger.running() == ["b"]
    assert ledger.available() == 2


def test_a_promotion_needs_only_the_extra(path: Path) -> None:
    ledger = SweepLedger.create(path, 30)
    assert ledger.admit("a", 10) and ledger.admit("b", 10)
    ledger.settle("a", 10, PAUSED)
    assert ledger.available() == 10
    assert not ledger.admit("c", 15)
    assert ledger.admit("a", 20)  # the whole rung would not fit, its extra 10 does
    assert ledger.trials()["a"] == TrialRecord(20, 10, RUNNING)
    assert ledger.available() == 0
    ledger.settle("b", 4, TrialState.CONVERGED)
    assert ledger.admit("c", 6)
    ledger.settle("a", 19, TrialState.DONE)
    assert ledger.spent() == 19 + 4 and ledger.available() == 30 - 23 - 6


def test_a_paused_trial_that_is_not_promoted_is_closed(path: Path) -> None:
    ledger = SweepLedger.create(path, 10)
    ledger.admit("a", 5)
    ledger.settle("a", 5, PAUSED)
    assert ledger.close("a", "PRUNED") == TrialRecord(5, 5, TrialState.PRUNED)
    with pytest.raises(ValueError, match="only a PAUSED trial"):
        ledger.admit("a", 8)


def test_the_invariant_holds_after_random_operations(path: Path) -> None:
    rng = random.Random(0)
    ledger = SweepLedger.create(path, 100)
    refused = 0
    for step in range(300):
        trials = ledger.trials()
        running = [i for i, t in trials.items() if t.state is RUNNING]
        paused = [i for i, t in trials.items() if t.state is PAUSED]
        available = ledger.budget - committed(trials)
        operation = rng.choice(["new", "new", "promote", "settle", "settle", "close", "budget"])
        if operation == "new":
            limit = rng.randint(1, 40)
            admitted = ledger.admit(f"t{step}", limit)
            assert admitted == (limit <= available)
            refused += not admitted
        elif operation == "promote" and paused:
            trial_id = rng.choice(paused)
            limit = trials[trial_id].cost + rng.randint(1, 40)
            admitted = ledger.admit(trial_id, limit)
            assert admitted == (limit - trials[trial_id].cost <= available)
            refused += not admitted
        elif operation == "settle" and running:
            trial_id = rng.choice(running)
            trial = trials[trial_id]
            cost = rng.randint(trial.cost, trial.limit)
            assert ledger.settle(trial_id, cost, rng.choice(SETTLE_STATES)).cost == cost
        elif operation == "close" and paused:
            ledger.close(rng.choice(paused), rng.choice([TrialState.PRUNED, TrialState.DONE]))
        elif operation == "budget":
            ledger.raise_budget(max(1, committed(trials) + rng.randint(0, 40)))
        assert_invariant(ledger)
        assert all(t.overrun == 0 for t in ledger.trials().values())
    assert refused > 10 and len(ledger.trials()) > 30  # the sequence did meet a full ledger


def test_raise_budget_admits_more_and_refuses_lowering_below_what_is_committed(
    path: Path,
) -> None:
    ledger = SweepLedger.create(path, 10)
    assert ledger.admit("a", 6)
    ledger.settle("a", 4, TrialState.DONE)
    assert ledger.admit("b", 5)  # committed: 4 spent + 5 granted
    assert not ledger.admit("c", 5)
    ledger.raise_budget(14)
    assert ledger.budget == 14 and ledger.admit("c", 5)
    with pytest.raises(ValueError, match="already spent or granted"):
        ledger.raise_budget(13)
    ledger.raise_budget(14)  # equal to what is committed: allowed
    assert SweepLedger(path).budget == 14


def test_a_cost_above_the_grant_is_recorded_and_flagged(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = SweepLedger.create(path, 20)
    ledger.admit("a", 10)
    with caplog.at_level(logging.ERROR, logger="budgets.ledger"):
        record = ledger.settle("a", 12, TrialState.DONE)
    assert record == TrialRecord(10, 12, TrialState.DONE, overrun=2)
    assert "above its grant" in caplog.text
    assert ledger.spent() == 12 and ledger.available() == 8  # never hidden


def test_bad_inputs_raise_value_error_and_change_nothing(path: Path) -> None:
    for budget in [0, -5, True, 2.5, "10"]:
        with pytest.raises(ValueError):
            SweepLedger.create(path, budget)  # type: ignore[arg-type]
    ledger = SweepLedger.create(path, 50)
    ledger.admit("running", 10)
    ledger.admit("paused", 10)
    ledger.settle("paused", 6, PAUSED)
    ledger.admit("done", 5)
    ledger.settle("done", 5, TrialState.DONE)
    before = path.read_bytes()
    bad = [
        lambda: ledger.admit("new", 0),
        lambda: ledger.admit("new", -1),
        lambda: ledger.admit("new", True),
        lambda: ledger.admit("new", 2.0),
        lambda: ledger.admit("", 5),
        lambda: ledger.admit(7, 5),
        lambda: ledger.admit("running", 20),  # already RUNNING
        lambda: ledger.admit("done", 20),  # final
        lambda: ledger.admit("paused", 6),  # not above its cost
        lambda: ledger.settle("nobody", 1, "DONE"),
        lambda: ledger.settle("running", 1, RUNNING),
        lambda: ledger.settle("running", 1, "BOGUS"),
        lambda: ledger.settle("running", -1, "DONE"),
        lambda: ledger.settle("paused", 8, "DONE"),  # not RUNNING: settled twice
        lambda: ledger.close("running", "PRUNED"),
        lambda: ledger.close("paused", PAUSED),
        lambda: ledger.raise_budget(0),
        lambda: ledger.raise_budget(20),  # below the 6 + 5 spent and 10 granted
        lambda: ledger.raise_budget(20.0),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()
    assert path.read_bytes() == before
    ledger.admit("paused", 9)
    with pytest.raises(ValueError, match="cumulative"):
        ledger.settle("paused", 5, "DONE")  # below the cost of its earlier rung
    with pytest.raises(FileExistsError):
        SweepLedger.create(path, 50)
    with pytest.raises(FileNotFoundError):
        SweepLedger(path.with_name("missing.json"))
    foreign = path.with_name("foreign.json")
    foreign.write_text('{"name": "not a ledger"}')
    with pytest.raises(ValueError, match="not a sweep ledger"):
        SweepLedger(foreign)


# A worker: waits for the start signal, then admits trials and settles each with its whole grant
# spent, so the sum of the granted limits equals the sum of costs. Prints how many it admitted.
WORKER = """
import random, sys, time
from pathlib import Path
from budgets.ledger import SweepLedger

path, go = Path(sys.argv[1]), Path(sys.argv[4])
worker, attempts = int(sys.argv[2]), int(sys.argv[3])
ledger = SweepLedger(path)
rng = random.Random(worker)
while not go.exists():
    time.sleep(0.001)
admitted, held = 0, []
for i in range(attempts):
    limit = rng.randint(1, 5)
    if ledger.admit(f"w{worker}-{i}", limit):
        admitted += 1
        held.append((f"w{worker}-{i}", limit))
    if len(held) > 2 or (held and rng.random() < 0.3):
        trial_id, limit = held.pop(0)
        ledger.settle(trial_id, limit, "DONE")
for trial_id, limit in held:
    ledger.settle(trial_id, limit, "DONE")
print(admitted)
"""


def test_processes_sharing_one_ledger_never_over_admit_nor_lose_an_update(
    path: Path, tmp_path: Path
) -> None:
    budget, attempts = 150, 60
    SweepLedger.create(path, budget)
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(n), str(attempts), str(go)],
            env=ENV,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    go.touch()
    admitted = 0
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err  # a lost update fails a worker's own settle
        admitted += int(out)
    ledger = SweepLedger(path)
    trials = ledger.trials()
    assert len(trials) == admitted  # no admission lost to a concurrent write
    assert all(t.state is TrialState.DONE and t.cost == t.limit for t in trials.values())
    assert sum(t.limit for t in trials.values()) <= budget  # never over-admitted
    assert admitted < 4 * attempts  # the ledger did fill: some admissions were refused
    assert ledger.spent() > budget // 2


KILLED_AFTER_THREE = """
import os, signal, sys
from budgets.ledger import SweepLedger

ledger = SweepLedger(sys.argv[1])
for trial_id in "abc":
    assert ledger.admit(trial_id, 10)
ledger.settle("a", 7, "DONE")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_process_leaves_its_last_state_and_recover_settles_the_dead(path: Path) -> None:
    SweepLedger.create(path, 100)
    child = subprocess.run([sys.executable, "-c", KILLED_AFTER_THREE, str(path)], env=ENV, cwd=REPO)
    assert child.returncode == -signal.SIGKILL
    ledger = SweepLedger(path)
    assert ledger.trials() == {
        "a": TrialRecord(10, 7, TrialState.DONE),
        "b": TrialRecord(10, 0, RUNNING),
        "c": TrialRecord(10, 0, RUNNING),
    }
    assert ledger.available() == 100 - 7 - 20
    # b's training died having spent 4; c's is still running.
    assert ledger.recover({"b": 4}.get) == {"b": 4}
    assert ledger.trials()["b"] == TrialRecord(10, 4, TrialState.FAILED)
    assert ledger.running() == ["c"]
    assert ledger.available() == 100 - 7 - 4 - 10
    # c's cost cannot be read: charging its whole grant is safe.
    assert ledger.recover(lambda trial_id: ledger.trials()[trial_id].limit) == {"c": 10}
    assert ledger.running() == [] and ledger.spent() == 21
    assert ledger.admit("d", 79)  # the dead process's lock was released


def test_recover_keeps_the_cost_of_earlier_rungs(path: Path) -> None:
    ledger = SweepLedger.create(path, 100)
    ledger.admit("a", 10)
    ledger.settle("a", 10, PAUSED)
    ledger.admit("a", 30)
    assert ledger.recover(lambda trial_id: 0) == {"a": 10}
    assert ledger.trials()["a"].state is TrialState.FAILED


BUSY = """
import sys
from budgets.ledger import SweepLedger

ledger = SweepLedger(sys.argv[1])
i = 0
while True:
    i += 1
    if ledger.admit(f"t{i}", 1 + i % 3):
        ledger.settle(f"t{i}", i % 3, "PAUSED" if i % 2 else "DONE")
"""


def test_a_process_killed_while_writing_leaves_a_consistent_ledger(path: Path) -> None:
    SweepLedger.create(path, 10_000)
    child = subprocess.Popen([sys.executable, "-c", BUSY, str(path)], env=ENV, cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while len(SweepLedger(path).trials()) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    ledger = SweepLedger(path)  # parses: never a half-written file
    assert len(ledger.trials()) >= 30
    assert_invariant(ledger)
    assert len(ledger.running()) <= 1
    ledger.recover(lambda trial_id: ledger.trials()[trial_id].limit)
    assert ledger.running() == [] and ledger.admit("after", 1)
