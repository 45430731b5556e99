"""The Hydra entry point of `python -m trainer` for training jobs (single runs and sweeps)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.errors import UserError
from trainer.settings import CONF_DIR, validate


# An absolute path: run as `-m trainer`, Hydra would look for a Python module named conf.
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def train_job(cfg: DictConfig) -> float:
    for noisy in ("lightning.pytorch", "lightning.fabric", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    try:
        validate(resolved)
        start = None
        if resolved["resume_operation"] or resolved["base_model_id"]:
            resolved, run_dir, start = _continuation(resolved, overrides, run_dir)
        # Imported here so that a config error is reported before torch and Lightning load.
        from trainer.train import run_training

        return run_training(resolved, run_dir, start)
    except UserError as error:
        # SystemExit passes through Hydra's error reporting, which would print a traceback.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None


def _continuation(cfg: dict[str, Any], overrides: list[str], run_dir: Path):
    """The config, run directory and starting point of a resumed or further training."""
    from trainer import continuation
    from trainer.store import Store

    store = Store(cfg["mlflow"]["tracking_uri"], cfg["mlflow"]["experiment_name"])
    if cfg["resume_operation"]:
        run_dir, state = continuation.for_resume(store, cfg["resume_operation"])
        cfg = continuation.resume_config(state.config, overrides)
        validate(cfg)
        start = continuation.StartFrom(
            checkpoints=continuation.resume_candidates(run_dir),
            labels=state.labels or None,
            state=state,
            base_model_id=state.base_model_id,
        )
        return cfg, run_dir, start
    tags = continuation.base_model_tags(store, cfg["base_model_id"])
    if "model_type" not in continuation.explicit_keys(overrides):
        # Training further keeps the base model's type unless the user names one.
        composed = hydra.compose("config", [*overrides, f"model_type={tags.get('modelType')}"])
        cfg = OmegaConf.to_container(composed, resolve=True)
        validate(cfg)
    return cfg, run_dir, continuation.from_base_model(cfg, store, tags)
