"""Sweeps under one total budget (trainer/sweep/): the search space and rungs here, and real
sweeps of tiny trainings in processes of their own (slow: make test-all)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import FAST, REPO, read_json
from tests.test_resume import wait_for
from trainer.errors import UserError
from trainer.sweep.rungs import RungResult, promotable, rung_budgets
from trainer.sweep.runner import settings_of
from trainer.sweep.space import parse_space

META = "imageClassificationModelMetadata"
SWEEP = {
    "budget_milli_node_hours": 40, "min_trial_milli_node_hours": 8, "reduction_factor": 2,
    "max_trial_milli_node_hours": 16, "pruning": "successive_halving", "sampler": "tpe",
    "seed": 0, "parallel": 2, "gpus_per_trial": 0, "executor": "local", "slurm": {},
    "storage": None, "max_trials": None,
}  # fmt: skip


def composed() -> tuple[object, dict]:
    from hydra import compose, initialize_config_dir

    from trainer import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    return cfg, OmegaConf.to_container(cfg.hydra.runtime.choices)


def test_the_space_is_hydras_grammar_checked_against_the_config() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    cfg, groups = composed()
    space = parse_space(
        ["optimizer.lr=tag(log,interval(1e-4,1e-1))", "data.batch_size=choice(16,32)",
         "model_type=choice(mobile-low-latency-1,mobile-versatile-1)", "seed=interval(1,9)",
         "dataset.path=/data", "sweep.parallel=2"],
        cfg, groups,
    )  # fmt: skip
    assert space.distributions["optimizer.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert space.distributions["data.batch_size"] == CategoricalDistribution([16, 32])
    assert space.distributions["seed"] == IntDistribution(1, 9)  # a whole-number key
    assert space.distributions["model_type"].choices == (
        "mobile-low-latency-1", "mobile-versatile-1",
    )  # fmt: skip
    assert space.fixed == ["dataset.path=/data"]  # the sweep's own keys are not a trial's
    assert space.overrides({"optimizer.lr": 0.01, "data.batch_size": 16}) == [
        "dataset.path=/data", "optimizer.lr=0.01", "data.batch_size=16",
    ]  # fmt: skip


def test_a_trials_values_reach_it_as_they_were_chosen() -> None:
    """Each value goes on the trial's command line quoted where Hydra's grammar would read it
    otherwise: a comma would make a list, a quote end the value, "1e-3" become a number."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from trainer.sweep.space import SearchSpace

    chosen = {"a": "two words, one comma", "b": "it's", "c": "back\\", "d": "1e-3",
              "e": "null", "f": "${oc.env:HOME}", "g": 0.5, "h": True,
              "i": "plain-word"}  # fmt: skip
    parser = OverridesParser.create()
    overrides = SearchSpace({}, []).overrides(chosen)
    assert {o.key_or_group: o.value() for o in parser.parse_overrides(overrides)} == chosen
    assert "i=plain-word" in overrides


@pytest.mark.parametrize(
    ("argument", "says"),
    [
        ("optimizer.lrr=interval(0.1,1)", "optimizer.lrr is not a key"),
        ("display_name=choice(a,b)", "set by the sweep, not searched"),
        ("model.type=interval(1,2)", "needs a numeric key"),
        ("optimizer.lr=0.1", "at least one parameter to search"),
        ("resume_operation=ICN1", "has no place in a sweep"),
    ],
)
def test_a_bad_space_is_refused_in_one_line(argument: str, says: str) -> None:
    cfg, groups = composed()
    with pytest.raises(UserError, match=says) as refused:
        parse_space([argument], cfg, groups)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("changed", "says"),
    [
        ({"budget_milli_node_hours": 7}, "below one trial of the first rung"),
        ({"min_trial_milli_node_hours": 20}, "at most sweep.max_trial_milli_node_hours"),
        ({"parallel": 0}, "sweep.parallel=0 must be at least 1"),
        ({"sampler": "cmaes"}, "sweep.sampler='cmaes'"),
        ({"budget_milli_node_hours": None}, "sweep.budget_milli_node_hours=N"),
    ],
)
def test_bad_sweep_settings_are_refused(changed: dict, says: str) -> None:
    with pytest.raises(UserError, match=says):
        settings_of({**SWEEP, **changed})


def test_rungs_are_budgets_and_promotion_takes_the_best_of_each_rung() -> None:
    assert rung_budgets(10, 3, 90, "successive_halving") == [10, 30, 90]
    assert rung_budgets(10, 3, 100, "successive_halving") == [10, 30, 90, 100]
    assert rung_budgets(10, 3, 90, "none") == [90]
    results = [RungResult(0, 0.5), RungResult(1, 0.9), RungResult(2, 0.7), RungResult(3, 0.8)]
    assert promotable(results, [0, 1, 2, 3], 2, maximize=True) == [1, 3]  # the best half
    assert promotable(results, [0, 2, 3], 2, maximize=True) == [3]  # 1 is running already
    assert promotable(results, [0, 1, 2, 3], 2, maximize=False) == [0, 2]
    assert promotable(results[:1], [0], 2, maximize=True) == []  # too early to tell


# -- real sweeps ----------------------------------------------------------------------------

TRIAL = [*FAST, "budget.disable_early_stopping=true",
         "budget.save_reserve_seconds=6", "checkpoint.cost_flush_seconds=1"]  # fmt: skip


def sweep_command(data: Path, *settings: str) -> list[str]:
    return [
        sys.executable, "-m", "trainer", "-m", "hydra/sweeper=budgeted", f"dataset.path={data}",
        *TRIAL, "optimizer.lr=tag(log,interval(1e-4,3e-2))", *settings,
    ]  # fmt: skip


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    return {**env, "VISION_TRAINER_HOME": str(home), "PYTHONPATH": str(REPO)}


def cli(cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", "sweeps", *args], cwd=cwd, env=environment(home),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def sweep_json(cwd: Path, home: Path, sweep_id: str) -> dict:
    done = cli(cwd, home, "get", sweep_id, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def operation_costs(sweep: dict) -> int:
    """The sum of the trials' costs as their own operations billed them: a model's
    trainCostMilliNodeHours, else the seconds an unfinished operation spent. (A model's cost is
    measured once its network is logged; state.json's seconds also count the few writes after,
    which on a loaded machine can cross into the next milli-node-hour.)"""
    total = 0
    for trial in sweep["trials"]:
        run_dir = Path(trial["run_dir"])
        if (run_dir / "model_details.json").exists():
            total += int(read_json(run_dir / "model_details.json")["trainCostMilliNodeHours"])
        else:
            state = read_json(run_dir / "state.json")
            total += int(-(-state["spent_seconds"] // 3.6))
    return total


def test_a_bad_sweep_is_refused_before_any_work(tmp_path: Path, tiny_shapes: Path) -> None:
    home = tmp_path / "home"
    done = subprocess.run(
        sweep_command(tiny_shapes, "sweep.budget_milli_node_hours=4",
                      "sweep.min_trial_milli_node_hours=8"),
        cwd=tmp_path, env=environment(home), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "below one trial of the first rung" in errors[0]
    assert not (home / "sweeps").exists()


@pytest.mark.slow
def test_a_sweep_promotes_by_continuing_and_its_costs_fit_its_budget(
    tmp_path: Path, tiny_shapes: Path
) -> None:
    """Two trials at once, successive halving 8 -> 16; one trial killed with SIGKILL."""
    home, budget = tmp_path / "home", 48
    process = subprocess.Popen(
        sweep_command(tiny_shapes, f"sweep.budget_milli_node_hours={budget}",
                      "sweep.min_trial_milli_node_hours=8", "sweep.max_trial_milli_node_hours=16",
                      "sweep.reduction_factor=2", "sweep.parallel=2"),
        cwd=tmp_path, env=environment(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(list(home.glob("sweeps/*/trials/*.json"))) >= 3, timeout=300)
        killed = json.loads(max(home.glob("sweeps/*/trials/*.json")).read_text())
        wait_for(lambda: (Path(killed["run_dir"]) / "state.json").is_file(), timeout=120)
        os.kill(killed["pid"], signal.SIGKILL)  # a trial dies without a word
        stdout, stderr = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    sweep_id = stdout.split()[0]
    sweep = sweep_json(tmp_path, home, sweep_id)
    assert sweep["status"] == "SUCCEEDED"
    trials = {t["number"]: t for t in sweep["trials"]}
    assert trials[killed["number"]]["state"] == "FAILED"
    # Two at once: the first two trials opened their operations together, where one rung of
    # one trial takes 28.8 s.
    from trainer.store.resources import parse_time

    opened = [parse_time(read_json(Path(trials[n]["run_dir"]) / "operation.json")["metadata"]
                         ["createTime"]) for n in (0, 1)]  # fmt: skip
    assert abs((opened[0] - opened[1]).total_seconds()) < 10
    # Each its own slot (its own GPUs, where any); a promotion later takes whichever is free.
    assert {trials[n]["results"][0]["slot"] for n in (0, 1)} == {0, 1}, sweep["trials"]
    assert int(sweep["costMilliNodeHours"]) <= budget
    assert operation_costs(sweep) <= int(sweep["costMilliNodeHours"]) <= budget

    # A promoted trial went on: the same operation and model, its step and cost continued.
    promoted = [t for t in trials.values() if len(t["results"]) == 2]
    assert promoted, sweep
    first, second = promoted[0]["results"]
    assert second["global_step"] > first["global_step"] > 0
    assert second["cost"] > first["cost"] and second["cost"] <= 16
    model = read_json(Path(promoted[0]["run_dir"]) / "model.json")
    assert model["name"].endswith(promoted[0]["model"])
    assert model[META]["trainBudgetMilliNodeHours"] == "16"

    # A pruned trial's model stays on record, as does every trial's run under the sweep's.
    pruned = [t for t in trials.values() if t["state"] == "PRUNED"]
    assert pruned, sweep
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    assert client.get_registered_model(pruned[0]["model"])
    children = client.search_runs(
        [r.info.experiment_id for r in [client.get_run(sweep["parentRunId"])]],
        f"tags.mlflow.parentRunId = '{sweep['parentRunId']}'",
    )
    assert len(children) == len([t for t in trials.values()
                                 if (Path(t["run_dir"]) / "state.json").is_file()])  # fmt: skip
    child = next(c for c in children if c.data.tags["sweep_trial"] == str(promoted[0]["number"]))
    assert child.data.params["optimizer.lr"] == str(promoted[0]["params"]["optimizer.lr"])
    assert child.data.tags["sweep_rung"] == "1" and child.data.tags["sweep_cost"] == str(
        second["cost"]
    )
    parent = client.get_run(sweep["parentRunId"])
    assert parent.data.tags["bestModelId"] == sweep["bestModelId"] != ""
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert "sweep/metric_vs_cost.png" in artifacts
    shown = cli(tmp_path, home, "get", sweep_id)
    assert shown.returncode == 0 and "optimizer.lr" in shown.stdout


def running_sweep(tmp_path: Path, data: Path, *settings: str) -> tuple[subprocess.Popen, Path]:
    home = tmp_path / "home"
    process = subprocess.Popen(
        sweep_command(data, *settings), cwd=tmp_path, env=environment(home),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return process, home


def trials_training(home: Path, count: int) -> list[dict]:
    """Once ``count`` trials have trained (a step at least; one may already have ended, its
    budget spent): their records."""

    def training() -> list[dict]:
        found = []
        for path in home.glob("sweeps/*/trials/*.json"):
            trial = json.loads(path.read_text())
            state = Path(trial["run_dir"]) / "state.json"
            if state.is_file() and read_json(state).get("global_step", 0) >= 1:
                found.append(trial)
        return found

    wait_for(lambda: len(training()) >= count, timeout=300)
    return training()


@pytest.mark.slow
def test_a_killed_sweep_resumes_with_more_budget_and_its_trials_count_once(
    tmp_path: Path, multilabel_csv: Path
) -> None:
    """On a MULTILABEL dataset, whose trials are judged by their val_auprc."""
    process, home = running_sweep(
        tmp_path, multilabel_csv, "sweep.budget_milli_node_hours=24",
        "sweep.min_trial_milli_node_hours=12", "sweep.pruning=none",
        "sweep.max_trial_milli_node_hours=12", "sweep.parallel=2",
        # FAST judges convergence on val_accuracy, which a MULTILABEL model has not.
        "task.convergence_monitor=val_loss", "task.convergence_monitor_mode=min",
    )  # fmt: skip
    running = trials_training(home, 2)
    process.kill()  # the sweep dies; its trials train on in sessions of their own
    process.communicate(timeout=30)
    (folder,) = home.glob("sweeps/*")
    sweep_id = folder.name
    assert sweep_json(tmp_path, home, sweep_id)["status"] == "INTERRUPTED"

    # 24 more: room for a third trial's minimum (12) even where each of the first two went a
    # milli-node-hour over its grant (a loaded CI machine; 36 then left 10).
    resumed = cli(tmp_path, home, "resume", sweep_id, "sweep.budget_milli_node_hours=48")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sweep = sweep_json(tmp_path, home, sweep_id)
    assert sweep["status"] == "SUCCEEDED" and sweep["budgetMilliNodeHours"] == "48"
    numbers = {t["number"] for t in sweep["trials"]}
    assert {t["number"] for t in running} <= numbers and len(numbers) >= 3, sweep["trials"]
    # More were fitted until what is left cannot grant a trial its minimum (12): how many
    # depends on what each trial spent, which its reserves may leave below its grant.
    assert 48 - int(sweep["costMilliNodeHours"]) < 12, sweep["trials"]
    assert all(t["state"] == "DONE" for t in sweep["trials"])  # adopted, settled once
    assert operation_costs(sweep) <= int(sweep["costMilliNodeHours"]) <= 48
    # Each trial's value is the best val_auprc its training recorded.
    assert sweep["monitor"] == "val_auprc"
    for trial in sweep["trials"]:
        best = read_json(Path(trial["run_dir"]) / "metrics.json")["best_val_auprc"]
        assert trial["value"] == pytest.approx(best)


@pytest.mark.slow
def test_a_cancelled_sweep_on_submitits_executor_leaves_no_process(
    tmp_path: Path, tiny_shapes: Path
) -> None:
    process, home = running_sweep(
        tmp_path, tiny_shapes, "sweep.budget_milli_node_hours=40", "sweep.pruning=none",
        "sweep.min_trial_milli_node_hours=20", "sweep.max_trial_milli_node_hours=20",
        "sweep.executor=submitit_local",
    )  # fmt: skip
    try:
        (trial,) = trials_training(home, 1)
        (folder,) = home.glob("sweeps/*")
        assert list((folder / "submitit").glob("*")), "submitit's job folder"
        cancelled = cli(tmp_path, home, "cancel", folder.name)
        assert cancelled.returncode == 0, cancelled.stderr[-3000:]
        process.communicate(timeout=60)
    finally:
        process.kill()
    sweep = sweep_json(tmp_path, home, folder.name)
    assert sweep["status"] == "CANCELLED"
    (settled,) = sweep["trials"]
    assert settled["state"] == "CANCELLED" and 0 < settled["cost"] <= 20
    assert read_json(Path(trial["run_dir"]) / "state.json")["status"] == "CANCELLED"
    time.sleep(1)
    leftovers = [p for p in Path("/proc").glob("[0-9]*/cmdline")
                 if str(tmp_path).encode() in _read(p)]  # fmt: skip
    assert leftovers == []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
