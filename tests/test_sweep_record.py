"""A sweep's records (trainer/sweep/record.py) typed in memory and camelCase on disk, as sweeps
already on disk wrote them; a trial's cost billed by the meter's own formula; a resumed sweep
recovering the grants of trials that never got a record. No training, no process."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from budgets.ledger import SweepLedger, TrialState
from budgets.ledger import TrialRecord as Grant
from budgets.meter import milli_node_hours
from tests.test_sweep import SWEEP
from trainer.errors import UserError
from trainer.sweep import record
from trainer.sweep.record import RungRecord, SweepRecord, SweepStatus, TrialRecord
from trainer.sweep.runner import Sweep, orphan_cost, trial_outcome

# sweep.json as the release before typed records wrote it for a new sweep.
WRITTEN = {
    "name": "sweeps/SWP1234567890123456789", "createTime": "2025-01-02T03:04:05.000000Z",
    "status": "RUNNING", "settings": SWEEP, "rungs": [8, 16], "arguments": [
        "dataset.path=/data", "optimizer.lr=tag(log,interval(1e-4,3e-2))",
    ],
    "fixed": ["dataset.path=/data"],
    "distributions": {
        "optimizer.lr": '{"name": "FloatDistribution", "attributes": {"step": null, "low": '
        '0.0001, "high": 0.03, "log": true}}',
    },
    "monitor": "val_accuracy", "maximize": True, "idPrefix": "ICN", "home": "/home/h",
    "cwd": "/work", "trackingUri": "sqlite:////work/mlflow.db", "experiment": "vision-trainer",
    "parentRunId": "0123abcd", "pid": 4242,
}  # fmt: skip
# A trial's record from before sweeps had slots.
TRIAL = {
    "number": 3, "params": {"optimizer.lr": 0.002}, "operation": "ICN11", "model": "ICN12",
    "run_dir": "/home/h/sweeps/SWP1/trials/3", "rung": 1, "state": "PAUSED", "pid": None,
    "results": [
        {"budget": 8, "cost": 8, "value": 0.5, "stop_reason": "BUDGET_REACHED", "global_step": 9},
        {"budget": 16, "cost": 15, "value": 0.7, "stop_reason": "BUDGET_REACHED",
         "global_step": 19},
    ],
}  # fmt: skip

# Written back, the trial and each of its rungs say which slot they ran in (0 where unknown).
WRITTEN_BACK = {**TRIAL, "slot": 0, "results": [{**r, "slot": 0} for r in TRIAL["results"]]}


def test_a_sweep_on_disk_loads_typed_and_is_written_back_as_it_was(tmp_path: Path) -> None:
    sweep = SweepRecord.from_json(WRITTEN)
    assert sweep.status is SweepStatus.RUNNING and sweep.rungs == (8, 16)
    assert sweep.id == "SWP1234567890123456789" and sweep.parent_run_id == "0123abcd"
    assert not sweep.cancel_requested and sweep.update_time is None
    assert json.dumps(sweep.to_json()) == json.dumps(WRITTEN)  # the same keys, in order
    (tmp_path / "sweep.json").write_text(json.dumps(WRITTEN))
    assert record.read_sweep(tmp_path) == sweep
    with pytest.raises(AttributeError):
        sweep.status = SweepStatus.SUCCEEDED  # type: ignore[misc]


def test_a_resumed_and_ended_sweep_keeps_its_camelcase_keys() -> None:
    ended = SweepRecord.from_json(
        {**WRITTEN, "status": "SUCCEEDED", "cancelRequested": False, "updateTime": "2025-01-03"}
    )
    assert ended.status is SweepStatus.SUCCEEDED and ended.update_time == "2025-01-03"
    written = ended.to_json()
    assert written["updateTime"] == "2025-01-03" and "cancelRequested" not in written
    asked = SweepRecord.from_json({**WRITTEN, "cancelRequested": True})
    assert asked.cancel_requested and asked.to_json()["cancelRequested"] is True


def test_a_damaged_sweep_record_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "sweep.json").write_text(json.dumps({**WRITTEN, "status": "LOST"}))
    with pytest.raises(UserError, match="is not a sweep's record") as refused:
        record.read_sweep(tmp_path)
    assert "\n" not in str(refused.value)


def test_a_trial_record_uses_the_ledgers_states_and_keeps_its_json(tmp_path: Path) -> None:
    trial = TrialRecord.from_json(TRIAL)
    assert trial.state is TrialState.PAUSED and trial.slot == 0
    assert trial.cost == 15 and trial.value == 0.7
    assert trial.results[0] == RungRecord(8, 8, 0.5, "BUDGET_REACHED", 9)
    (tmp_path / "trials").mkdir()
    trial.save(tmp_path)
    assert json.loads((tmp_path / "trials" / "3.json").read_text()) == WRITTEN_BACK
    assert record.read_trials(tmp_path) == [trial]


def test_the_verbs_summary_is_the_record_with_the_ledgers_figures(tmp_path: Path) -> None:
    (tmp_path / "trials").mkdir()
    (tmp_path / "sweep.json").write_text(json.dumps({**WRITTEN, "pid": None}))
    ledger = SweepLedger.create(tmp_path / "ledger.json", 40)
    ledger.admit("3", 8)
    ledger.settle("3", 8, TrialState.PAUSED)
    ledger.admit("3", 16)
    TrialRecord.from_json(TRIAL).save(tmp_path)
    summary = record.summary(tmp_path)
    assert summary.sweep.status is SweepStatus.INTERRUPTED  # RUNNING, its process gone
    shown = summary.to_json()
    assert shown["status"] == "INTERRUPTED" and shown["trackingUri"] == WRITTEN["trackingUri"]
    assert (shown["budgetMilliNodeHours"], shown["costMilliNodeHours"]) == ("40", "8")
    assert shown["grantedMilliNodeHours"] == "8" and shown["bestModelId"] == "ICN12"
    assert shown["trials"] == [{**WRITTEN_BACK, "cost": 15, "value": 0.7}]
    assert "trials" not in summary.to_json(trials=False)


def write_state(run_dir: Path, **state: Any) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "state.json").write_text(json.dumps(state))
    return run_dir


def test_a_failed_trials_cost_is_the_meters_rounded_as_it_bills(tmp_path: Path) -> None:
    """1,380.6 s on 4 nodes is 1534 milli-node-hours. As two pieces of one operation (1380.4 s,
    then 0.2 s after a resume) the float sum is 1380.6000000000001: the meter's formula, with
    its guard against float noise, bills 1534; the formula the sweep wrote again billed 1535."""
    seconds = 1380.4 + 0.2
    assert math.ceil(seconds * 4 / 3.6) == 1535  # the copy without the guard
    assert milli_node_hours(seconds, 4) == 1534
    run_dir = write_state(tmp_path / "3", status="FAILED", spent_seconds=seconds, global_step=7,
                          config={"trainer": {"num_nodes": 4}})  # fmt: skip
    result, state = trial_outcome(run_dir, "val_accuracy", 2000)
    assert state is TrialState.FAILED
    assert result == RungRecord(2000, 1534, None, "FAILED", 7)
    cancelled = write_state(tmp_path / "4", status="CANCELLED", spent_seconds=18.0, global_step=1)
    assert trial_outcome(cancelled, "val_accuracy", 20) == (
        RungRecord(20, 5, None, "CANCELLED", 1), TrialState.CANCELLED,
    )  # fmt: skip


def test_a_trial_killed_without_a_word_is_charged_its_grant(tmp_path: Path) -> None:
    run_dir = write_state(tmp_path / "5", status="RUNNING", spent_seconds=3.0, global_step=2)
    assert trial_outcome(run_dir, "val_accuracy", 8) == (
        RungRecord(8, 8, None, "KILLED", 2), TrialState.FAILED,
    )  # fmt: skip
    assert trial_outcome(tmp_path / "never", "val_accuracy", 8) == (
        RungRecord(8, 0, None, "REFUSED", 0), TrialState.FAILED,
    )  # fmt: skip


def test_a_resumed_sweep_recovers_the_grants_of_trials_without_a_record(tmp_path: Path) -> None:
    """The sweep's process died after the ledger admitted trials 1 and 2 and before their
    records were written: 1 never started (no log), 2 may have (its log exists). Resumed, the
    sweep adopts trial 0, which has a record, and settles the other two grants as FAILED: 1 at
    nothing, 2 at its whole grant, which its training cannot exceed; Optuna is told."""
    folder = tmp_path / "SWP1"
    (folder / "trials").mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({**WRITTEN, "name": "sweeps/SWP1"}))
    ledger = SweepLedger.create(folder / "ledger.json", 40)
    for trial_id in "012":
        assert ledger.admit(trial_id, 8)
    TrialRecord(0, {"optimizer.lr": 0.01}, "ICN1", "ICN2", str(folder / "trials" / "0")).save(
        folder
    )
    (folder / "trials" / "2.log").write_text("")
    sweep = Sweep(folder, tracking_uri=None, storage=None)
    for _ in range(3):
        sweep.study.ask(sweep.space.distributions)
    sweep._adopt()
    assert ledger.trials() == {
        "0": Grant(8, 0, TrialState.RUNNING),
        "1": Grant(8, 0, TrialState.FAILED),
        "2": Grant(8, 8, TrialState.FAILED),
    }
    assert sweep.processes == {0: None}  # watched by its pid until it ends
    assert [t.state.name for t in sweep.study.trials] == ["RUNNING", "FAIL", "FAIL"]
    assert ledger.available() == 40 - 8 - 8


def test_an_orphaned_grant_is_free_only_where_its_trial_surely_never_started(
    tmp_path: Path,
) -> None:
    (tmp_path / "trials").mkdir()
    assert orphan_cost(tmp_path, "1", 8, "local") == 0
    assert orphan_cost(tmp_path, "1", 8, "slurm") == 8  # a submitted job may run
    (tmp_path / "trials" / "1.log").write_text("")
    assert orphan_cost(tmp_path, "1", 8, "local") == 8
