from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from trainer.settings import Settings
from trainer.tasks.image_classification.demo import write_shapes

REPO = Path(__file__).resolve().parent.parent
# An empty torch hub cache of the suite's own: model.pretrained=auto finds no weights there (the
# tests that want some put their own in), whatever this machine's cache holds.
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="vision-trainer-torch-home-")
LOCAL = "projects/local/locations/local"  # the parent of every resource name by default

# Small and quick: 32-pixel inputs, early stopping after two flat epochs, bounds opened up.
FAST = [
    "model.input_size=[32,32]",
    "data.batch_size=16",
    "early_stopping.patience=2",
    "early_stopping.min_patience_steps=0",
    "early_stopping.patience_before_first_gain=2",  # tiny runs: no longer wait for a slow start
    # Converged when the accuracy stalls: on tiny data it stalls two passes before the loss does
    # (conf/task/image_classification.yaml's default, the loss, is tested in test_pretrained.py).
    "task.convergence_monitor=val_accuracy",
    "task.convergence_monitor_mode=max",
    "budget.min_milli_node_hours=1",
    "budget.train_budget_milli_node_hours=200",
    "budget.save_reserve_seconds=4",  # tiny networks record in about 2 s on an idle machine
    # pt2, the default, takes 3 to 5 s more to record: tested in test_training_e2e.py.
    "mlflow.model_format=torchscript",
]
MOBILE = ["mobile-low-latency-1", "mobile-versatile-1", "mobile-high-accuracy-1"]
MOBILE_BUDGET = 6  # milli-node-hours each: 21.6 s, set-up, TEST pass and recording included

SMALL_BUDGETS = [
    "budget.min_milli_node_hours=1",
    "early_stopping.patience=2",
    "early_stopping.min_patience_steps=0",
    "early_stopping.patience_before_first_gain=2",
    "budget.save_reserve_seconds=8",  # larger networks than the image tests' to record
]
DETECTION = [
    "task=object_detection",
    "model.input_size=[64,64]",
    "data.batch_size=4",
    *SMALL_BUDGETS,
]
DETECTION_BUDGET = 12
# The demo videos and the default video model type as they are: a real training, about 50 s.
# Patience stays at its default, 5: validation accuracy sits near chance for the first epochs.
VIDEO = [
    "task=video_classification",
    "budget.min_milli_node_hours=1",
    "budget.save_reserve_seconds=8",
    # The demo reaches validation accuracy 1.0 within a dozen epochs; learning-rate drops
    # would add six more passes there (tested in test_convergence.py), not worth the suite's time.
    "early_stopping.lr_drop_patience=null",
    # Its passes are a few steps: the default min_patience_steps (400) would keep it training to
    # the budget's end, 65 s more of the suite (tested in test_convergence.py).
    "early_stopping.min_patience_steps=0",
]
VIDEO_BUDGET = 40


@pytest.fixture(scope="session")
def trainer_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_shapes")
    write_shapes(folder, per_label=24, size=32, seed=7)
    return folder


@pytest.fixture(scope="session")
def multilabel_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MULTILABEL CSV: 120 images of one to three shapes each, 32 px."""
    from trainer.tasks.image_classification.demo import write_multilabel_shapes

    return write_multilabel_shapes(tmp_path_factory.mktemp("multilabel"), 120, 32, seed=5)


def checked(
    home: Path, tracking_uri: str, *overrides: str, task: str = "image_classification"
) -> Settings:
    """The typed settings a training in ``home`` with its store at ``tracking_uri`` checks
    (trainer/job/settings.py), its type the task's default."""
    from trainer.job.settings import checked_settings
    from trainer.settings import composed

    where = [f"home={home}", f"mlflow.tracking_uri={tracking_uri}"]
    return checked_settings(composed(task, "default", [*where, *overrides]))


# Two processes, one training: Lightning's DDP over gloo on the CPU (tests/test_distributed.py).
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def run_trainer(
    *args: str, cwd: Path, home: Path, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "HYDRA_"))
    }
    # ``env`` may set PYTHONPATH too (a test that loads a module of its own first).
    environment.update({"VISION_TRAINER_HOME": str(home), "PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def cli_in_process(cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> Ran:
    """A management verb run in this process: the same code as `python -m trainer ...` in
    ``cwd``, without a new interpreter's 6 s of importing torch and Lightning (loaded here
    already). For verbs whose process boundary is not what a test is about."""
    from trainer.cli import run

    monkeypatch.chdir(cwd)
    # The verb's store is cwd's; what it sets in the environment is put back after the test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cwd / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    capsys.readouterr()
    code = run(list(args))
    out, err = capsys.readouterr()
    return Ran(code, out, err)


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "runs").rglob("operation.json"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def run_dir_of(cwd: Path, model: dict) -> Path:
    """The run directory that recorded ``model``, among the others in ``cwd``."""
    (found,) = [d for d in run_dirs(cwd) if (d / "model.json").is_file()
                and read_json(d / "model.json")["name"] == model["name"]]  # fmt: skip
    return found


def train(cwd: Path, home: Path, *args: str, timeout: float = 600) -> tuple[dict, Path]:
    """One training to the end; its Model resource and run directory."""
    result = run_trainer(*args, cwd=cwd, home=home, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    model = json.loads(result.stdout)
    return model, run_dir_of(cwd, model)


# -- trained models shared by the session ------------------------------------------------------
# Trainings are the suite's slowest work: each model below is trained once and shared by every
# test that needs a trained model of its kind. A test that changes one (its tags, its files) puts
# it back; a test that adds trainings to a shared store finds its own by name (run_dir_of).


@dataclass
class Trained:
    cwd: Path  # the working directory: its mlflow.db and runs/ are the model's store
    models: dict[str, dict] = field(default_factory=dict)  # by model type
    run_dirs: dict[str, Path] = field(default_factory=dict)
    budget: int = 0
    returns: list = field(default_factory=list)  # what each Hydra job returned

    def only(self) -> tuple[Path, Path, dict, int]:
        """The directory, run directory, model and budget of a one-model training."""
        ((model_type, model),) = self.models.items()
        return self.cwd, self.run_dirs[model_type], model, self.budget


@pytest.fixture(scope="session")
def multilabel_model(tmp_path_factory, trainer_home: Path, multilabel_csv: Path) -> Trained:
    """A MULTILABEL model (tests/test_multilabel.py) trained on two processes (DDP, gloo;
    tests/test_distributed.py): the validation metrics are gathered from both ranks, the TEST
    pass and the evaluation are rank 0's."""
    cwd, budget = tmp_path_factory.mktemp("multilabel_run"), 8  # 28.8 s; rank 1 starts in 6
    done = run_trainer(
        *FAST, *DDP, f"dataset.path={multilabel_csv}", "display_name=tags",
        f"budget.train_budget_milli_node_hours={budget}", "budget.disable_early_stopping=true",
        # FAST judges convergence on val_accuracy, which a MULTILABEL model has not: the default.
        "task.convergence_monitor=val_loss", "task.convergence_monitor_mode=min",
        cwd=cwd, home=trainer_home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 follows the operation" in done.stderr
    model = json.loads(done.stdout)
    run_dir = run_dir_of(cwd, model)
    return Trained(cwd, {"mobile-low-latency-1": model}, {"mobile-low-latency-1": run_dir}, budget)


@pytest.fixture(scope="session")
def mobile_models(tmp_path_factory, trainer_home: Path, tiny_shapes: Path) -> Trained:
    """One small model of each mobile image type, trained in one Hydra multirun until its budget
    is spent (BUDGET_REACHED), each job's return value recorded as a sweeper would read it."""
    cwd = tmp_path_factory.mktemp("mobile")
    record = cwd / "returns.jsonl"
    result = run_trainer(
        "-m", *FAST, f"dataset.path={tiny_shapes}", f"model_type={','.join(MOBILE)}",
        f"budget.train_budget_milli_node_hours={MOBILE_BUDGET}",
        "budget.disable_early_stopping=true",
        # Reserves from this home's own measurements: a fixed 4 s overran on a loaded CI machine.
        "budget.save_reserve_seconds=auto",
        "+hydra.callbacks.record._target_=tests.hydra_probe.RecordReturn",
        cwd=cwd, home=trainer_home, timeout=900, env={"RECORD_RETURN_FILE": str(record)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trained = Trained(cwd, budget=MOBILE_BUDGET)
    for run_dir in run_dirs(cwd):
        model = read_json(run_dir / "model.json")
        model_type = model["imageClassificationModelMetadata"]["modelType"]
        trained.models[model_type], trained.run_dirs[model_type] = model, run_dir
    trained.returns = [json.loads(line)["return_value"] for line in record.open()]
    return trained


@pytest.fixture(scope="session")
def detection_csv(tmp_path_factory) -> Path:
    from trainer.tasks.object_detection.demo import write_detection_shapes

    return write_detection_shapes(tmp_path_factory.mktemp("det"), images=40, size=64, seed=3)


@pytest.fixture(scope="session")
def detection_model(tmp_path_factory, trainer_home: Path, detection_csv: Path) -> Trained:
    """A small SSDlite (the default detection type) on 64-pixel generated shapes."""
    cwd = tmp_path_factory.mktemp("det_run")
    model, run_dir = train(
        cwd, trainer_home, *DETECTION, f"dataset.path={detection_csv}",
        f"budget.train_budget_milli_node_hours={DETECTION_BUDGET}", "display_name=boxes",
    )  # fmt: skip
    model_type = read_json(run_dir / "model_details.json")["modelType"]
    return Trained(cwd, {model_type: model}, {model_type: run_dir}, DETECTION_BUDGET)


@pytest.fixture(scope="session")
def video_csv(trainer_home: Path) -> Path:
    from trainer.tasks.video_classification.demo import ensure_demo_videos
    from trainer.tasks.video_classification.task import DEMO_VIDEOS_PER_LABEL

    return ensure_demo_videos(trainer_home, DEMO_VIDEOS_PER_LABEL)


@pytest.fixture(scope="session")
def video_model(tmp_path_factory, trainer_home: Path, video_csv: Path) -> Trained:
    """The default video type on the demo videos: a real training that must learn."""
    cwd = tmp_path_factory.mktemp("video_run")
    model, run_dir = train(
        cwd, trainer_home, *VIDEO, f"budget.train_budget_milli_node_hours={VIDEO_BUDGET}",
        "display_name=motion",
    )  # fmt: skip
    model_type = read_json(run_dir / "model_details.json")["modelType"]
    return Trained(cwd, {model_type: model}, {model_type: run_dir}, VIDEO_BUDGET)
