"""The Hydra entry point of `python -m trainer` for training jobs (single runs and sweeps)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer import CONF_DIR
from trainer.errors import UserError
from trainer.job.settings import checked_settings, model_types, parent
from trainer.settings import Settings, migrate, redact


# An absolute path: run as `-m trainer`, Hydra would look for a Python module named conf.
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def train_job(cfg: DictConfig) -> float:
    for noisy in (
        "lightning.pytorch",
        "lightning.fabric",
        "pytorch_lightning",
        "mlflow",
        "alembic",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    _redact_hydra_files(run_dir)
    with errors_reported():
        from trainer.job import distributed  # light: no torch until a rank needs it

        brief = distributed.brief_to_follow()
        if brief is not None:  # a rank other than 0: rank 0 is the operation
            return distributed.follow(brief, run_dir)
        if distributed.started_by_cluster():  # torchrun or srun started every rank
            if distributed.join_cluster(_cluster_facts(resolved)) != 0:
                return distributed.follow_cluster_rank(run_dir)
            try:
                return _operation(resolved, overrides, run_dir)
            finally:
                distributed.release_followers()
        return _operation(resolved, overrides, run_dir)


@contextlib.contextmanager
def errors_reported() -> Iterator[None]:
    """Errors as the user sees them, redacted: a UserError in one line (exit 2), any other with
    its traceback (exit 1). Never through Hydra's report, which prints the command line's
    overrides as they are (a tracking URI's password among them); SystemExit passes it by."""
    try:
        yield
    except UserError as error:
        print(f"error: {redact(error)}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    except Exception:
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        raise SystemExit(1) from None


def _cluster_facts(resolved: dict[str, Any]) -> tuple[str, int, int]:
    """What every rank of a torchrun or srun launch needs to join the group, before rank 0 has
    checked the config (a resume's is its operation's): the accelerator, budget and nodes."""
    trainer, budget = resolved["trainer"], resolved["budget"]
    return (
        str(trainer["accelerator"]),
        int(budget["train_budget_milli_node_hours"]),
        int(trainer["num_nodes"]),
    )


def _operation(resolved: dict[str, Any], overrides: list[str], run_dir: Path) -> float:
    """Global rank 0, or the only process: start, resume or train further an operation."""
    from trainer.job import slurm  # light: no torch

    slurm_key = slurm.job_key(overrides)
    resume = resolved["resume_operation"]
    if not resume:
        requeued = slurm.requeued_operation(resolved["home"], slurm_key)
        if requeued is not None:  # the same command in a requeued SLURM job: the same operation
            operation, status = requeued
            if status in slurm.FINISHED:
                print(f"{operation} ended {status} before SLURM requeued this job; nothing to do",
                      file=sys.stderr)  # fmt: skip
                return float("nan")
            print(f"resuming {operation}: SLURM requeued this job", file=sys.stderr)
            resume = operation.rsplit("/", 1)[-1]
    if resume:  # checked with the operation's own config and bounds
        settings, run_dir, start = _resumed(resolved, resume, overrides)
        if resolved["detach"]:
            return _detach(settings, overrides, run_dir, resumed=start.state.operation)
    else:
        settings = checked_settings(resolved)
        if settings.detach:
            return _detach(settings, overrides, run_dir)
        start = _further(settings, overrides) if settings.base_model_id else None
        if start is not None:
            settings, start = start
    # Imported here so that a config error is reported before torch and Lightning load.
    from trainer.job.train import run_training

    home = settings.home
    metric = run_training(
        settings, run_dir, start, on_open=lambda name, path: slurm.bind(home, slurm_key, name, path)
    )
    if settings.deploy_after_training:
        _deploy_trained(settings, run_dir)
    return metric


def _deploy_trained(settings: Settings, run_dir: Path) -> None:
    """deploy_after_training=true: the model of a training that succeeded, deployed."""
    from trainer.serving.deployments import deploy_on_record, online_defaults
    from trainer.store.catalog import Catalog

    operation = json.loads((run_dir / "operation.json").read_text())
    if not operation.get("done") or "error" in operation or "name" not in operation["response"]:
        return  # cancelled or failed: there is no model to deploy
    mlflow = settings.mlflow
    catalog = Catalog(mlflow.tracking_uri.reveal(), mlflow.experiment_name)
    model_id = operation["response"]["name"].rsplit("/", 1)[-1]
    deployment = deploy_on_record(catalog, model_id, online_defaults()["node_count"])
    print(f"deployed {model_id}: {deployment.url}", file=sys.stderr, flush=True)


def _redact_hydra_files(run_dir: Path) -> None:
    """Hydra keeps the command line's overrides in the run directory (.hydra/*.yaml); a
    tracking URI given there may hold user:password@, which no file of ours keeps."""
    for path in (run_dir / ".hydra").glob("*.yaml"):
        text = path.read_text()
        if redact(text) != text:
            path.write_text(redact(text))


# Overrides the background process of a detached training must not get again: detach itself
# (however it was written: ``++detach=true`` too, or every child would detach once more) and
# where it runs, which it is told.
NOT_PASSED_ON = {"detach", "hydra.run.dir", "hydra.output_subdir"}


def _detach(
    settings: Settings, overrides: list[str], run_dir: Path, resumed: str | None = None
) -> float:
    """Start the same training (or the resume of operation ``resumed``, in its own run
    directory) as a background process; print its operation name at once."""
    import os

    from trainer.background import start_training
    from trainer.job.run_state import release_run_dir
    from trainer.store.automl import bare_id
    from trainer.store.resources import new_id

    if HydraConfig.get().mode.name == "MULTIRUN":
        raise UserError("detach=true runs one training; drop -m, or launch each job detached")
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in NOT_PASSED_ON]
    where = parent(settings)
    if resumed is None:
        prefix = settings.task.id_prefix
        operation_id, model_id = new_id(prefix), new_id(prefix)
        ids: tuple[str, str] | None = (operation_id, model_id)
        doing = f"training {where.name('models', model_id)}"
    else:
        operation_id, ids = bare_id(resumed, "operations"), None
        kept.append("hydra.output_subdir=null")  # the operation's folder has its own
        release_run_dir(run_dir)  # the background process takes it
        doing = "resuming it"
    # Outlives this terminal and its Ctrl-C.
    _, log_file = start_training(kept, run_dir, os.environ, ids)
    print(where.name("operations", operation_id))
    print(f"{doing} in the background; log: {log_file}", file=sys.stderr)
    return float("nan")


def _resumed(resolved: dict[str, Any], operation_id: str, overrides: list[str]) -> Any:
    """An interrupted operation's settings (its saved config, migrated, with the overrides that
    may change), run directory and starting point."""
    from trainer.job import continuation
    from trainer.store.store import Store

    mlflow = resolved["mlflow"]  # the saved config's tracking URI is redacted: this one is not
    store = Store(mlflow["tracking_uri"], mlflow["experiment_name"])
    run_dir, state = continuation.for_resume(store, operation_id)
    saved = continuation.resume_config(migrate(state.config), overrides)
    settings = checked_settings({**saved, "mlflow": mlflow})
    start = continuation.StartFrom(
        checkpoints=continuation.resume_candidates(run_dir),
        labels=state.labels or None,
        state=state,
        base_model_id=state.base_model_id,
    )
    return settings, run_dir, start


def _further(settings: Settings, overrides: list[str]) -> Any:
    """The settings and starting point of a model trained further from ``base_model_id``: the
    base model's type unless the user names one."""
    from trainer.job import continuation
    from trainer.store.store import Store

    store = Store(settings.mlflow.tracking_uri.reveal(), settings.mlflow.experiment_name)
    tags = continuation.base_model_tags(store, str(settings.base_model_id))
    if "model_type" not in continuation.explicit_keys(overrides):
        # The type comes from the store: it becomes an override only if the task offers it.
        model_type = str(tags.get("modelType"))
        if model_type not in model_types(settings.task.name):
            raise UserError(
                f"base model {settings.base_model_id} has model type {model_type[:60]!r}, "
                f"which task {settings.task.name} does not offer"
            )
        composed = hydra.compose("config", [*overrides, f"model_type={model_type}"])
        settings = checked_settings(OmegaConf.to_container(composed, resolve=True))
    return settings, continuation.from_base_model(settings, store, tags)
