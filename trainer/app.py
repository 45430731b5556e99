"""The Hydra entry point of `python -m trainer` for training jobs (single runs and sweeps)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

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
    try:
        validate(resolved)
        # Imported here so that a config error is reported before torch and Lightning load.
        from trainer.train import run_training

        return run_training(resolved, run_dir)
    except UserError as error:
        # SystemExit passes through Hydra's error reporting, which would print a traceback.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
