"""A sweep's records (trainer/sweep/record.py) typed in memory and camelCase on disk, as sweeps
already on disk wrote them. No training, no process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from budgets.ledger import SweepLedger, TrialState
from tests.test_sweep import SWEEP
from trainer.errors import UserError
from trainer.sweep import record
from trainer.sweep.record import RungRecord, SweepRecord, SweepStatus, TrialRecord

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
    assert json.loads((tmp_path / "trials" / "3.json").read_text()) == {**TRIAL, "slot": 0}
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
    assert shown["trials"] == [{**TRIAL, "slot": 0, "cost": 15, "value": 0.7}]
    assert "trials" not in summary.to_json(trials=False)
