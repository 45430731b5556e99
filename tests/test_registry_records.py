"""A registered model's record: a short Markdown description for MLflow's UI, the Model resource
in the ``model_json`` tag where the verbs read it; entries registered by the previous release
(the JSON in the description) are still read, and entries that are not this project's (the
registry is shared) are passed by."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import cli_in_process
from trainer.store.automl import FIGURES
from trainer.store.reader import MODEL_TAG, RestReader

NEW_ID = "ICN2222222222222222222"
OLD_ID = "ICN3333333333333333333"
LOCAL = "projects/local/locations/local"
FIGURES_OF_NEW = {
    "baseModelId": "",
    "modelType": "mobile-versatile-1",
    "trainBudgetMilliNodeHours": "2000",
    "trainCostMilliNodeHours": "1873",
    "stopReason": "MODEL_CONVERGED",
    "nodeQps": 3.2,
    "nodeCount": "1",
}
NEW_MODEL = {
    "name": f"{LOCAL}/models/{NEW_ID}",
    "displayName": "flowers_v1",
    "datasetId": "e" * 16,
    "createTime": "2026-12-01T09:00:00.000000Z",
    "updateTime": "2026-12-01T09:30:00.000000Z",
    "deploymentState": "UNDEPLOYED",
    "imageClassificationModelMetadata": FIGURES_OF_NEW,
}
OLD_MODEL = {  # as the previous release registered it: the whole resource in the description
    "name": f"{LOCAL}/models/{OLD_ID}",
    "displayName": "older_release",
    "datasetId": "f" * 16,
    "createTime": "2026-11-20T09:00:00.000000Z",
    "updateTime": "2026-11-20T09:30:00.000000Z",
    "deploymentState": "UNDEPLOYED",
    "imageClassificationModelMetadata": {
        **FIGURES_OF_NEW,
        "modelType": "cloud",
        "stopReason": "BUDGET_REACHED",
    },
}
# Other teams' entries in the same registry: a plain-text description, none, or JSON that is
# not a Model; none has this project's tags.
FOREIGN = {
    "churn-classifier": "Gradient-boosted churn model, owned by the data team.",
    "ranker": "",
    "llm-prompt": '{"owner": "search", "version": 3}',
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A store with one model registered by this release, one by the previous release and
    another project's entries beside them; the working directory that holds it."""
    from trainer.store.store import Store, metadata_tags

    cwd = tmp_path_factory.mktemp("registry")
    store = Store(f"sqlite:///{cwd / 'mlflow.db'}", "vision-trainer")
    operation = f"{LOCAL}/operations/{NEW_ID}"
    run_id = store.start_run("flowers_v1", {"operation": operation, "model_id": NEW_ID}, {})
    # A network is not what this is about: an empty logged model stands in for one.
    logged_model = store.client.create_logged_model(store.experiment_id, source_run_id=run_id)
    logged = SimpleNamespace(
        model_uri=f"models:/{logged_model.model_id}", model_id=logged_model.model_id
    )
    details = {"expireTime": "2028-06-01T09:00:00.000000Z", **FIGURES_OF_NEW}
    extra = {"task": "image_classification", "run_id": run_id, "operation": operation}
    store.register(run_id, logged, NEW_MODEL, details, extra)

    old_details = {
        "expireTime": "2028-05-20T09:00:00.000000Z",
        **OLD_MODEL["imageClassificationModelMetadata"],
    }
    old_tags = {**metadata_tags(OLD_MODEL, old_details), "task": "image_classification"}
    store.client.create_registered_model(OLD_ID, tags=old_tags, description=json.dumps(OLD_MODEL))
    for name, description in FOREIGN.items():
        store.client.create_registered_model(name, description=description or None)
    return cwd


def registered_row(cwd: Path, name: str) -> tuple[str, dict[str, str]]:
    with sqlite3.connect(cwd / "mlflow.db") as db:
        (description,) = db.execute(
            "SELECT description FROM registered_models WHERE name = ?", (name,)
        ).fetchone()
        tags = dict(
            db.execute(
                "SELECT key, value FROM registered_model_tags WHERE name = ?", (name,)
            ).fetchall()
        )
    return description, tags


def test_the_description_is_a_readable_summary(registry: Path) -> None:
    description, tags = registered_row(registry, NEW_ID)
    with pytest.raises(ValueError):
        json.loads(description)
    assert description.startswith("**`flowers_v1`**")
    for shown in (
        "image_classification",
        "`mobile-versatile-1`",
        "2000 milli-node-hours",
        "cost: 1873",
        "MODEL_CONVERGED",
        "2026-12-01 09:00:00 UTC",
        f"`{LOCAL}/operations/{NEW_ID}`",
        f"models get {NEW_ID} --json",
    ):
        assert shown in description
    assert len(description.splitlines()) < 12
    # The machine-readable record is the tag, and the figures stay tags of their own.
    assert json.loads(tags[MODEL_TAG]) == NEW_MODEL
    assert {key: tags[key] for key in FIGURES} == {k: str(v) for k, v in FIGURES_OF_NEW.items()}


def test_models_list_shows_both_formats_and_skips_other_projects(
    registry: Path, monkeypatch, capsys
) -> None:
    listing = cli_in_process(registry, monkeypatch, capsys, "models", "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert len(lines) == 3  # the header and this project's two models
    assert NEW_ID in lines[1] and "flowers_v1" in lines[1] and "MODEL_CONVERGED" in lines[1]
    assert OLD_ID in lines[2] and "older_release" in lines[2] and "BUDGET_REACHED" in lines[2]
    for name in FOREIGN:
        assert name not in listing.stdout

    listed = cli_in_process(registry, monkeypatch, capsys, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"model": [NEW_MODEL, OLD_MODEL]}

    wanted = cli_in_process(
        registry, monkeypatch, capsys, "models", "list", "--filter", "model_type=cloud", "--json"
    )
    assert json.loads(wanted.stdout) == {"model": [OLD_MODEL]}


def test_models_get_reads_both_formats(registry: Path, monkeypatch, capsys) -> None:
    for model in (NEW_MODEL, OLD_MODEL):
        for given in (model["name"], model["name"].rsplit("/", 1)[1]):
            got = cli_in_process(registry, monkeypatch, capsys, "models", "get", given, "--json")
            assert got.returncode == 0, got.stderr
            assert json.loads(got.stdout) == model
    shown = cli_in_process(registry, monkeypatch, capsys, "models", "get", NEW_ID)
    assert "trainCostMilliNodeHours" in shown.stdout and "1873" in shown.stdout
    assert MODEL_TAG not in shown.stdout and "2028-06-01" in shown.stdout


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_another_projects_entry_is_not_a_model_here(
    registry: Path, monkeypatch, capsys, name: str
) -> None:
    for verb in ("get", "delete"):
        refused = cli_in_process(registry, monkeypatch, capsys, "models", verb, name)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"model {name!r} is not in" in refused.stderr
    assert registered_row(registry, name)[0] == (FOREIGN[name] or None)  # left as it was


def test_the_rest_reader_reads_the_same_record() -> None:
    """A tracking server's JSON, as registered-models/get and /search return it."""
    new = RestReader._model(
        {
            "name": NEW_ID,
            "description": "**`flowers_v1`**, trained by vision-trainer",
            "tags": [
                {"key": "model_id", "value": NEW_ID},
                {"key": MODEL_TAG, "value": json.dumps(NEW_MODEL)},
            ],
        }
    )
    old = RestReader._model({"name": OLD_ID, "description": json.dumps(OLD_MODEL)})
    churn = "churn-classifier"
    foreign = RestReader._model({"name": churn, "description": FOREIGN[churn]})
    bare = RestReader._model({"name": "ranker"})
    assert new.resource() == NEW_MODEL and old.resource() == OLD_MODEL
    assert foreign.resource() is None and bare.resource() is None
