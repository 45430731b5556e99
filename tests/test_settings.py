"""One typed configuration: checked once, secrets redacted, one place for the store and its
experiment, and configs saved by older versions read through one migration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FAST, LOCAL, cli_in_process, read_json, run_trainer, train
from tests.typed import settings
from trainer.errors import UserError
from trainer.settings import BEFORE_IT_EXISTED, Secret, Settings, Workspace, migrate

URI = "https://alice:p@ss@mlflow.example.com:5000/path"
META = "imageClassificationModelMetadata"
# Stops BUDGET_REACHED (so that it may be resumed with more), in a few seconds.
SHORT = [*FAST, "budget.train_budget_milli_node_hours=5", "budget.disable_early_stopping=true"]


def test_a_secret_prints_and_serializes_redacted_and_reveals_only_on_request() -> None:
    secret = Secret(URI)
    assert str(secret) == "https://mlflow.example.com:5000/path"  # the @ in the password too
    assert "p@ss" not in repr(secret) and "p@ss" not in f"{secret}"
    assert secret.reveal() == URI
    typed = settings(mlflow={"tracking_uri": URI})
    assert typed.mlflow.tracking_uri.reveal() == URI
    assert "p@ss" not in json.dumps(typed.to_dict()) and "p@ss" not in repr(typed)


def test_settings_are_frozen_and_a_change_is_a_checked_copy() -> None:
    typed = settings()
    with pytest.raises(ValueError):
        typed.model.input_size = (64, 64)  # type: ignore[misc]
    settled = typed.replace_in("model", input_size=[64, 96])
    assert settled.model.size == (64, 96) and typed.model.input_size == "auto"
    with pytest.raises(UserError, match=r"model.input_size=\[0, 5\]"):
        typed.replace_in("model", input_size=[0, 5])


def test_a_setting_this_version_does_not_know_is_named() -> None:
    raw = settings().to_dict()
    raw["data"]["cache_size"] = 3
    with pytest.raises(UserError, match="data.cache_size is not a setting"):
        Settings.parse(raw)


def test_an_old_config_gets_todays_keys_and_what_their_absence_meant() -> None:
    today = settings().to_dict()
    old = json.loads(json.dumps(today))
    for section, keys in BEFORE_IT_EXISTED.items():
        for key in keys:
            del old[section][key]
    del old["task"]["convergence_monitor"], old["mlflow"]["model_format"]
    old["retired_key"] = 1
    migrated = Settings.parse(migrate(old))
    assert migrated.optimizer.lr_schedule == "constant" and migrated.data.cache == "off"
    assert migrated.optimizer.pretrained_lr_factor == 1.0  # no fine-tuning then
    assert migrated.task.convergence_monitor == "val_loss"  # a task's facts: today's
    assert migrated.mlflow.model_format == today["mlflow"]["model_format"]
    assert Settings.parse(migrate(today)) == Settings.parse(today)  # today's: unchanged


def test_the_cli_reads_the_store_and_experiment_a_training_uses(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", URI)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "another_team")
    monkeypatch.setenv("VISION_TRAINER_HOME", "/somewhere")
    workspace = Workspace.current()
    assert workspace.tracking_uri.reveal() == URI and workspace.experiment_name == "another_team"
    assert workspace.home == "/somewhere"
    assert Workspace.of(settings()) == workspace  # the same resolution as a training's


def operation_ids(ran) -> list[str]:
    """The IDs of an ``operations list`` table (its header first, ``(none)`` when empty)."""
    lines = ran.stdout.splitlines()[1:]
    return [line.split()[0] for line in lines if line.strip() and line != "(none)"]


def test_a_model_trained_into_another_experiment_is_found_with_its_operations_there(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path, monkeypatch, capsys
) -> None:
    """mlflow.experiment_name=another_team: the verbs find the model (the registry is shared)
    and, in that experiment, its operation and those of its prediction and export."""
    model, run_dir = train(
        tmp_path, trainer_home, *SHORT, f"dataset.path={tiny_shapes}",
        "mlflow.experiment_name=another_team",
    )  # fmt: skip
    model_id = model["name"].rsplit("/", 1)[-1]
    training = read_json(run_dir / "operation.json")["name"].rsplit("/", 1)[-1]

    def verb(*args: str):
        ran = cli_in_process(tmp_path, monkeypatch, capsys, "--experiment", "another_team", *args)
        assert ran.returncode == 0, ran.stderr
        return ran

    assert model_id in verb("models", "list").stdout
    assert json.loads(verb("models", "get", model_id, "--json").stdout)["name"] == model["name"]
    assert operation_ids(verb("operations", "list")) == [training]
    assert json.loads(verb("operations", "get", training, "--json").stdout)["done"]
    default = cli_in_process(tmp_path, monkeypatch, capsys, "operations", "list")
    assert training not in default.stdout  # another experiment's

    image = next(tiny_shapes.rglob("*.png"))
    (tmp_path / "batch.csv").write_text(f"{image}\n")
    verb("predict", model_id, "--input", "batch.csv", "--output", "out")
    verb("models", "export", model_id, "--format", "torchscript", "--output", "exports")
    listed = operation_ids(verb("operations", "list"))
    assert training in listed and len(listed) == 3  # the training, the prediction, the export
    assert operation_ids(cli_in_process(tmp_path, monkeypatch, capsys, "operations", "list")) == []
    # The environment variable says the same as the flag, as for a training.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "another_team")
    assert sorted(operation_ids(cli_in_process(tmp_path, monkeypatch, capsys, "operations",
                                               "list"))) == sorted(listed)  # fmt: skip


def make_old(config: dict) -> dict:
    """A config as an older version saved it: none of the keys added since."""
    old = json.loads(json.dumps(config))
    for section, keys in BEFORE_IT_EXISTED.items():
        for key in keys:
            old[section].pop(key)
    for key in ("convergence_monitor", "convergence_monitor_mode"):
        old["task"].pop(key)
    old["mlflow"].pop("model_format")
    return old


@pytest.mark.slow  # three trainings and a prediction: about a minute
def test_an_old_format_config_resumes_trains_further_and_predicts(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path, monkeypatch, capsys
) -> None:
    model, run_dir = train(tmp_path, trainer_home, *SHORT, f"dataset.path={tiny_shapes}")
    assert model[META]["stopReason"] == "BUDGET_REACHED"
    state = read_json(run_dir / "state.json")
    state["config"] = make_old(state["config"])
    (run_dir / "state.json").write_text(json.dumps(state))
    model_id = model["name"].rsplit("/", 1)[-1]

    image = next(tiny_shapes.rglob("*.png"))
    (tmp_path / "batch.csv").write_text(f"{image}\n")
    predicted = cli_in_process(
        tmp_path, monkeypatch, capsys, "predict", model_id, "--input", "batch.csv",
        "--output", "out",
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr

    further = run_trainer(
        *SHORT, f"dataset.path={tiny_shapes}", f"base_model_id={model_id}", cwd=tmp_path,
        home=trainer_home,
    )  # fmt: skip
    assert further.returncode == 0, further.stderr[-3000:]
    assert json.loads(further.stdout)[META]["baseModelId"] == model_id

    operation = read_json(run_dir / "operation.json")["name"].rsplit("/", 1)[-1]
    resumed = run_trainer(
        f"resume_operation={operation}", "budget.train_budget_milli_node_hours=10",
        cwd=tmp_path, home=trainer_home,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["name"] == model["name"]  # the same model, further on
    config = read_json(run_dir / "state.json")["config"]
    # Saved again in today's shape, with what the old config's silence meant.
    assert config["optimizer"]["lr_schedule"] == "constant" and config["data"]["cache"] == "off"
    assert config["task"]["convergence_monitor"] == "val_loss"  # a task's facts: today's
    assert Settings.parse(config).budget.train_budget_milli_node_hours == 10
    assert model["name"].startswith(LOCAL)
