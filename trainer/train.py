"""One budgeted training, top to bottom: check, measure, train, evaluate, record.

The budget meter starts once the config has been checked; everything after that, data setup,
training, validation, the final TEST evaluation and the recording of the model, is billed.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from budgets import BudgetMeter
from budgets.callback import BudgetStopping
from trainer import data as datasets
from trainer.backbones import build_backbone
from trainer.demo_data import ensure_demo_dataset
from trainer.errors import UserError
from trainer.images import LabelledImages, eval_transform, make_loader, train_transform
from trainer.module import ImageClassifier
from trainer.progress import ProgressReport
from trainer.resources import (
    Operation,
    classification_metadata,
    model_resource,
    new_id,
    utc_now,
    write_json_atomic,
)
from trainer.settings import TrainSettings, validate
from trainer.store import Store

log = logging.getLogger("trainer")
# Lightning sets its loggers to INFO on import and adds tips; keep stderr for our own progress.
for _noisy in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
warnings.filterwarnings("ignore", ".*Saving pytorch model by Pickle.*")

MODEL_CONVERGED = "MODEL_CONVERGED"
BUDGET_REACHED = "BUDGET_REACHED"
CANCELLED = 1  # google.rpc.Code
INTERNAL = 13


def run_training(cfg: dict[str, Any], run_dir: Path) -> float:
    """Train one model as ``cfg`` says; return its best validation metric (for sweepers)."""
    settings = validate(cfg)
    meter = BudgetMeter(settings.budget, settings.nodes)
    meter.start()
    task = cfg["task"]
    model_id = new_id(task["id_prefix"])
    operation = Operation(new_id(task["id_prefix"]), run_dir / "operation.json")
    log.info("operation %s started for models/%s in %s", operation.name, model_id, run_dir)
    store = Store(cfg["mlflow"]["tracking_uri"], cfg["mlflow"]["experiment_name"])
    run_id = store.start_run(
        settings.display_name,
        {"operation": operation.name, "model_id": model_id, "task": task["name"]},
        cfg,
    )
    try:
        return _train(cfg, settings, meter, model_id, operation, store, run_id, run_dir)
    except BaseException as error:
        cost = meter.cost_milli_node_hours()
        code = 2 if isinstance(error, UserError) else INTERNAL
        if isinstance(error, KeyboardInterrupt):
            code = CANCELLED
        operation.fail(code, f"{type(error).__name__}: {error} (cost {cost} milli-node-hours)")
        store.set_tags(run_id, {"trainCostMilliNodeHours": str(cost), "state": "FAILED"})
        store.end_run(run_id, "KILLED" if code == CANCELLED else "FAILED")
        raise


def _train(
    cfg: dict[str, Any],
    settings: TrainSettings,
    meter: BudgetMeter,
    model_id: str,
    operation: Operation,
    store: Store,
    run_id: str,
    run_dir: Path,
) -> float:
    task, model_cfg, data_cfg = cfg["task"], cfg["model"], cfg["data"]
    create_time = utc_now()
    manifest = _load_manifest(cfg)
    log.info("dataset: %s", datasets.describe(manifest))
    pl.seed_everything(cfg["seed"], workers=True, verbose=False)

    size, mean, std = model_cfg["input_size"], data_cfg["mean"], data_cfg["std"]
    augment = train_transform(size, mean, std, data_cfg["crop_scale"], data_cfg["horizontal_flip"])
    evaluate = eval_transform(size, mean, std)

    def loader(split: str, transform, shuffle: bool):
        images = LabelledImages(manifest.split(split), manifest.labels, transform)
        return make_loader(
            images, data_cfg["batch_size"], data_cfg["num_workers"], shuffle, cfg["seed"]
        )

    train_loader = loader(datasets.TRAIN, augment, True)
    val_loader = loader(datasets.VALIDATE, evaluate, False)
    test_loader = loader(datasets.TEST, evaluate, False)

    backbone = build_backbone(
        model_cfg["constructor"], len(manifest.labels), bool(model_cfg["pretrained"])
    )
    module = ImageClassifier(
        backbone, len(manifest.labels), cfg["optimizer"]["lr"], cfg["optimizer"]["weight_decay"]
    )

    budget = BudgetStopping(meter, len(test_loader), cfg["budget"]["save_reserve_seconds"])
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=task["monitor"],
        mode=task["monitor_mode"],
        save_last=True,
        save_top_k=1,
    )
    early_stopping = None
    if not cfg["budget"]["disable_early_stopping"]:
        early_stopping = EarlyStopping(
            monitor=task["monitor"],
            mode=task["monitor_mode"],
            patience=cfg["early_stopping"]["patience"],
            min_delta=cfg["early_stopping"]["min_delta"],
        )
    progress = ProgressReport(budget, task["monitor"], operation.progress, early_stopping)
    callbacks = [c for c in (budget, checkpoints, progress, early_stopping) if c is not None]

    trainer_cfg = cfg["trainer"]
    trainer = pl.Trainer(
        accelerator=trainer_cfg["accelerator"],
        devices=trainer_cfg["devices"],
        num_nodes=trainer_cfg["num_nodes"],
        precision=trainer_cfg["precision"],
        max_epochs=-1,  # the budget and early stopping decide when training ends
        num_sanity_val_steps=1,  # also times one validation batch before training starts
        callbacks=callbacks,
        logger=MLFlowLogger(
            experiment_name=cfg["mlflow"]["experiment_name"],
            tracking_uri=cfg["mlflow"]["tracking_uri"],
            run_id=run_id,
        ),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=trainer_cfg["log_every_n_steps"],
        default_root_dir=run_dir,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
        trainer.fit(module, train_loader, val_loader)
        if budget.steps_done == 0:
            raise UserError(
                f"budget.train_budget_milli_node_hours={settings.budget} is too small to train "
                f"even one step after setup ({meter.cost_milli_node_hours()} spent); raise it"
            )
        stop_reason = BUDGET_REACHED if budget.stopped_by_budget else MODEL_CONVERGED
        best_score = float(
            checkpoints.best_model_score or trainer.callback_metrics[task["monitor"]]
        )

        # The final model is the best one by the validation metric.
        best_path = checkpoints.best_model_path or checkpoints.last_model_path
        test_results = trainer.test(module, test_loader, ckpt_path=best_path, verbose=False)[0]

    val_images = len(val_loader.dataset)
    node_qps = val_images / max(budget.eval_batch.last() * len(val_loader), 1e-9) / settings.nodes
    metrics = {
        "test_accuracy": float(test_results["test_accuracy"]),
        "test_loss": float(test_results["test_loss"]),
        f"best_{task['monitor']}": best_score,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
    }
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.info("test accuracy %.4f, test loss %.4f", metrics["test_accuracy"], metrics["test_loss"])

    def resource(cost: int) -> dict[str, Any]:
        metadata = classification_metadata(
            model_cfg["type"], settings.budget, cost, stop_reason, node_qps, settings.nodes
        )
        return model_resource(
            model_id,
            settings.display_name,
            manifest.fingerprint(),
            create_time,
            task["metadata_key"],
            metadata,
        )

    example = next(iter(test_loader))[0][:2].numpy()
    started = time.monotonic()
    model_uri = store.log_network(run_id, module.backbone.eval(), example)
    # The cost is measured once the network is logged; what follows is a few small writes.
    model = resource(meter.cost_milli_node_hours())
    extra_tags = {
        "task": task["name"],
        "labels": json.dumps(manifest.labels),
        "run_dir": str(run_dir.resolve()),
        "operation": operation.name,
        "state": "SUCCEEDED",
    }
    store.register(run_id, model_uri, model, task["metadata_key"], extra_tags)
    write_json_atomic(run_dir / "model.json", model)
    operation.succeed(model)
    store.log_files(run_id, [run_dir / f for f in ("model.json", "metrics.json", "operation.json")])
    store.end_run(run_id)
    log.info("recorded the model in %.1f s", time.monotonic() - started)
    print(json.dumps(model, indent=2), flush=True)
    return best_score


def _load_manifest(cfg: dict[str, Any]) -> datasets.Manifest:
    path = cfg["dataset"]["path"]
    if path is None:
        path = ensure_demo_dataset(cfg["home"])
    return datasets.read_dataset(path)
