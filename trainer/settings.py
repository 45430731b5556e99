"""The training's settings: the composed Hydra config as typed, frozen values, checked once.

``Settings.parse`` turns the resolved config (conf/ composed with the user's overrides) into
these types at the entry point; nothing further down reads a raw dict or checks a value again.
Defaults live in conf/ only: no field here has one. A config saved by an older version
(state.json, a stored model's config) goes through ``migrate`` first, which fills what it lacks
from today's conf/ for its task and model type.

pydantic checks the types (it is already installed with MLflow, and FastAPI's API server will
speak it); the checks whose messages users know (a budget, a mode, a size) raise ``UserError``
themselves, and any other mistake becomes one ``UserError`` line naming the key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from budgets import BudgetOutOfBounds, check_budget
from trainer.errors import UserError

CREDENTIALS = re.compile(r"://[^/\s]*@")  # a URL's user:password@ (the password may hold an @)
MODES = ("auto", "on", "off")


def redact(text: Any) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed: what files, logs and
    error lines may show of a tracking URI such as MLFLOW_TRACKING_URI."""
    return CREDENTIALS.sub("://", str(text))


class Secret:
    """A value that may carry credentials (a tracking URI with ``user:password@``): it prints,
    logs and serializes redacted; only ``reveal()``, for the client that connects, gives it in
    the clear."""

    __slots__ = ("_value",)

    def __init__(self, value: str | Secret) -> None:
        self._value = value.reveal() if isinstance(value, Secret) else str(value)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return redact(self._value)

    def __repr__(self) -> str:
        return f"Secret({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


SecretText = Annotated[
    Secret,
    BeforeValidator(lambda value: value if isinstance(value, Secret) else Secret(str(value))),
    # Redacted in every JSON dump (files, MLflow, briefs); a copy made in Python keeps it.
    PlainSerializer(str, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string"}),
]


# -- the checks users know the messages of ---------------------------------------------------


def mode(key: str, value: Any) -> str:
    """auto, on or off (YAML's booleans read as on and off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    found = str(value).lower()
    if found not in MODES:
        raise UserError(f"{key}={value!r} is invalid: use auto, on or off")
    return found


def _number(value: Any) -> float:
    """``value`` as a float; NaN for what is no number (a bool included), which every range
    check below refuses."""
    try:
        return float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        return math.nan


def share(key: str, value: Any) -> float:
    """A share of the device's memory, above 0 and at most 1."""
    found = _number(value)
    if not 0 < found <= 1:  # NaN fails too
        raise UserError(
            f"{key}={value!r} is invalid: use a fraction of the device's memory above 0 and at "
            "most 1, e.g. 0.25"
        )
    return found


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def checked_size(value: Any, key: str) -> tuple[int, int]:
    """``[height, width]``, each between 1 and 4096."""
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r} must be [height, width] or auto") from None
    if not (0 < height <= 4096 and 0 < width <= 4096):
        raise UserError(f"{key}={value!r} must be [height, width] between 1 and 4096")
    return height, width


MULTICLASS, MULTILABEL = "MULTICLASS", "MULTILABEL"  # AutoML's classificationType
AUTO = "auto"  # dataset.classification_type: MULTILABEL when a CSV row has several labels


def classification_type(key: str, value: Any) -> str:
    """``dataset.classification_type``: auto, MULTICLASS or MULTILABEL, in any case."""
    found = str(value).upper()
    if found not in (AUTO.upper(), MULTICLASS, MULTILABEL):
        raise UserError(f"{key}={value!r} is invalid: use auto, {MULTICLASS} or {MULTILABEL}")
    return AUTO if found == AUTO.upper() else found


def pretrained_mode(setting: Any) -> str:
    """``model.pretrained`` as one of auto, true, false (trainer/tasks/pretrained.py)."""
    found = str(setting).lower()
    if found not in ("auto", "true", "false"):
        raise UserError(f"model.pretrained={setting!r} must be auto, true or false")
    return found


def _non_negative(key: str, value: Any, expected: str) -> float:
    found = _number(value)
    if not found >= 0:  # NaN fails too
        raise UserError(f"{key}={value!r} is invalid: {expected}")
    return found


def _whole(key: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{key}={value!r} must be a whole number >= {least}")
    return value


def _checked(key: str, check: Callable[[str, Any], Any]) -> BeforeValidator:
    return BeforeValidator(lambda value: check(key, value))


Size = tuple[int, int]
Mode = Literal["auto", "on", "off"]
MetricMode = Literal["min", "max"]  # whether a metric improves downwards or upwards
T = TypeVar("T", bound="Section")


class Section(BaseModel):
    """A group of conf/: frozen, every key required (its default is conf/'s), none unknown."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes``, checked as the original was."""
        return type(self).model_validate({**self.model_dump(), **changes})


class TaskSettings(Section):
    """conf/task/<task>.yaml: facts of the task, not the user's to change."""

    name: str
    id_prefix: str
    metadata_key: str
    automl_api: str
    automl_metadata_fields: tuple[str, ...]
    monitor: str
    monitor_mode: MetricMode
    convergence_monitor: str
    convergence_monitor_mode: MetricMode
    # A MULTILABEL model's monitor and monitor_mode, in place of the above (None: no such models).
    multilabel: dict[str, str] | None
    model_lifespan_months: int
    input_stride: int
    online_prediction: bool  # deployable (trainer/serving/); AutoML Video's were batch only


class DatasetSettings(Section):
    path: str | None
    classification_type: Annotated[
        str, _checked("dataset.classification_type", classification_type)
    ]


class DataSettings(Section):
    batch_size: Annotated[int, _checked("data.batch_size", lambda k, v: _whole(k, v, 1))]
    num_workers: int
    crop_scale: tuple[float, float]
    horizontal_flip: bool
    mean: tuple[float, float, float]  # one per color channel
    std: tuple[float, float, float]
    cache: Annotated[Mode, _checked("data.cache", mode)]
    cache_max_gb: float
    cache_num_workers: int | Literal["auto"]
    cache_on_device: Annotated[Mode, _checked("data.cache_on_device", mode)]
    cache_on_device_share: Annotated[float, _checked("data.cache_on_device_share", share)]


class ModelSettings(Section):
    """conf/task_model/<task>/<type>.yaml's ``model``: what the type means for the task."""

    type: str
    constructor: str
    input_size: Size | Literal["auto"]
    largest_input_size: Size
    smallest_input_size: Size
    pretrained: Annotated[Literal["auto", "true", "false"], BeforeValidator(pretrained_mode)]
    # Video types only: the frames a clip holds and the step between them.
    frames_per_clip: int | None = None
    frame_stride: int | None = None

    @field_validator("input_size", mode="before")
    @classmethod
    def _input_size(cls, size: Any) -> Any:
        return "auto" if is_auto(size) else checked_size(size, "model.input_size")

    @property
    def size(self) -> Size:
        """The settled input size (after ``input_size=auto`` was resolved from the data)."""
        if self.input_size == "auto":
            raise ValueError("model.input_size is still auto: settle it from the data first")
        return self.input_size


class BudgetSettings(Section):
    min_milli_node_hours: int
    max_milli_node_hours: int
    train_budget_milli_node_hours: int  # within the bounds: _within_bounds
    disable_early_stopping: bool
    save_reserve_seconds: Annotated[
        float | Literal["auto"],
        _checked(
            "budget.save_reserve_seconds",
            lambda k, v: (
                "auto"
                if str(v) == "auto"
                else _non_negative(k, v, "use auto or a number of seconds")
            ),
        ),
    ]
    save_reserve_first_seconds: float
    save_reserve_first_mb_per_second: float
    save_reserve_factor: float
    save_reserve_floor_seconds: float

    @model_validator(mode="before")
    @classmethod
    def _within_bounds(cls, data: Any) -> Any:
        """The budget within the model type's bounds, as budgets.check_budget words it."""
        try:
            budget = check_budget(
                data.get("train_budget_milli_node_hours"),
                data.get("min_milli_node_hours"),
                data.get("max_milli_node_hours"),
            )
        except BudgetOutOfBounds as error:
            raise UserError(str(error)) from None
        return {**data, "train_budget_milli_node_hours": budget}


class OptimizerSettings(Section):
    name: str
    lr: float
    weight_decay: float
    pretrained_lr_factor: float
    warmup_steps: int
    lr_schedule: Annotated[
        Literal["budget_linear", "constant"],
        _checked("optimizer.lr_schedule", lambda k, v: _one_of(k, v, "budget_linear", "constant")),
    ]
    final_lr_factor: Annotated[
        float, _checked("optimizer.final_lr_factor", lambda k, v: _factor(k, v))
    ]

    @property
    def follows_budget(self) -> bool:
        return self.lr_schedule == "budget_linear"


def _one_of(key: str, value: Any, *choices: str) -> str:
    if value not in choices:
        raise UserError(f"{key}={value!r}: use {' or '.join(choices)}")
    return str(value)


def _factor(key: str, value: Any) -> float:
    found = _number(value)
    if not 0 < found <= 1:  # NaN fails too
        raise UserError(f"{key}={value!r} must lie in (0, 1]")
    return found


class EarlyStoppingSettings(Section):
    smoothing_window: int
    lr_drop_patience: int | None
    lr_drop_factor: float
    lr_drops: int
    patience: int
    min_patience_steps: int
    patience_before_first_gain: int | None
    anneal_before_stopping: bool
    min_delta: float


class CheckpointSettings(Section):
    every_minutes: float
    cost_flush_seconds: float
    cancel_poll_seconds: float


class ResumeSettings(Section):
    max_base_model_age_days: float


class TrainerSettings(Section):
    """Lightning's Trainer, as conf/trainer/default.yaml sets it."""

    accelerator: str
    devices: int | str
    num_nodes: Annotated[int, _checked("trainer.num_nodes", lambda k, v: _whole(k, v, 1))]
    strategy: str
    precision: str | int
    log_every_n_steps: int
    channels_last: bool | Literal["auto"]
    compile: bool
    compile_reserve_seconds: float


class AutomlSettings(Section):
    project: str
    location: str


class MlflowSettings(Section):
    tracking_uri: SecretText
    experiment_name: str
    model_format: Literal["pt2", "torchscript"]


class Settings(Section):
    """One training, as the user asked for it (conf/config.yaml and its groups)."""

    task: TaskSettings
    model: ModelSettings
    dataset: DatasetSettings
    dataset_id: str | None  # a dataset on record, read in place of dataset.path
    data: DataSettings
    budget: BudgetSettings
    optimizer: OptimizerSettings
    early_stopping: EarlyStoppingSettings
    checkpoint: CheckpointSettings
    resume: ResumeSettings
    trainer: TrainerSettings
    # A sweep's settings: the sweeper reads them (trainer/sweep/); a training ignores them.
    sweep: Mapping[str, Any]
    automl: AutomlSettings
    mlflow: MlflowSettings
    display_name: str
    base_model_id: str | None
    resume_operation: str | None
    detach: bool
    deploy_after_training: bool
    seed: Annotated[int, _checked("seed", lambda k, v: _integer(k, v))]
    home: str

    @classmethod
    def parse(cls, resolved: Mapping[str, Any]) -> Settings:
        """The resolved config (``OmegaConf.to_container(cfg, resolve=True)``) checked and
        typed; a mistake is one ``UserError`` line that names the key."""
        raw = {key: value for key, value in resolved.items() if key != "hydra"}
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            raise UserError(_one_line(error)) from None

    def to_dict(self) -> dict[str, Any]:
        """As files, the store, the DDP brief and sweeps keep it: plain JSON, secrets redacted."""
        return self.model_dump(mode="json")

    def replace_in(self, section: str, **changes: Any) -> Settings:
        """A copy whose ``section`` has ``changes``: settling the input size or precision."""
        return self.model_copy(update={section: getattr(self, section).replace(**changes)})


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key}={value!r} must be an integer")
    return value


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("function-",)))
    if first["type"] == "missing":
        return f"the config has no {key}: it is missing from conf/ or from a saved config"
    if first["type"] == "extra_forbidden":
        return f"{key} is not a setting of this version; see conf/ (python -m trainer --cfg job)"
    return f"{key}={first.get('input')!r} is invalid: {first['msg']}"


# -- configs saved by older versions ------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s values on top, section by section."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            merged[key] = deep_merge(base[key], value)
        else:
            merged[key] = value
    return merged


def migrate(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A config saved by an older version (state.json, a stored model's config) in today's
    shape: whatever it lacks comes from conf/ composed for its task and model type (a task's
    facts, a setting added since), and keys that no longer exist are dropped. The one reader
    of saved configs: the code after it has no fallback of its own."""
    try:  # already today's shape (this version saved it): nothing to compose or fill
        Settings.parse(saved)
        return dict(saved)
    except UserError:
        pass
    today = composed(str(saved["task"]["name"]), str(saved["model"]["type"]))
    as_it_began = {
        section: {key: value for key, value in keys.items() if key not in saved.get(section, {})}
        for section, keys in BEFORE_IT_EXISTED.items()
    }
    return dict(_known(deep_merge(deep_merge(today, as_it_began), saved), today))


# What a config saved before a key existed meant by its absence: how the version that saved it
# behaved, so that a resumed operation goes on as it began (its rate schedule, its caching, its
# convergence rules). Any other key it lacks takes today's conf/ value.
BEFORE_IT_EXISTED: dict[str, dict[str, Any]] = {
    "optimizer": {"pretrained_lr_factor": 1.0, "warmup_steps": 0, "lr_schedule": "constant"},
    "data": {"cache": "off", "cache_on_device": "off"},
    "early_stopping": {
        "smoothing_window": 1,
        "min_patience_steps": 0,
        "anneal_before_stopping": False,
    },
    "trainer": {"channels_last": False, "compile": False},
    "dataset": {"classification_type": MULTICLASS},  # one label a row; later cells ignored
}


def composed(task: str, model_type: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """conf/ composed for ``task`` and ``model_type`` (a type the task no longer offers: its
    default), resolved, without Hydra's own section."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from trainer import CONF_DIR

    offered = {p.stem for p in (CONF_DIR / "task_model" / task).glob("*.yaml")}
    if not offered:
        raise UserError(f"the saved config's task {task[:60]!r} is not a task of this version")
    chosen = model_type if model_type in offered else "default"
    arguments = [f"task={task}", f"model_type={chosen}", *overrides]
    if GlobalHydra.instance().is_initialized():  # inside the Hydra app: its own conf/
        config = compose("config", arguments)
    else:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            config = compose("config", arguments)
    resolved = OmegaConf.to_container(config, resolve=True)
    assert isinstance(resolved, dict)
    return {str(key): value for key, value in resolved.items() if key != "hydra"}


def _known(merged: Mapping[str, Any], today: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for key, value in merged.items():
        if key not in today:
            continue
        if isinstance(value, Mapping) and isinstance(today.get(key), Mapping) and key != "sweep":
            yield key, dict(_known(value, today[key]))
        else:
            yield key, value


# -- where a process works: the CLI's, the sweep verbs' and a training's alike -------------------


class Workspace(Section):
    """The home (caches, sweeps, work history), the MLflow store and its experiment."""

    home: str
    tracking_uri: SecretText
    experiment_name: str

    @classmethod
    def of(cls, settings: Settings) -> Workspace:
        """A training's: its resolved ``home`` and ``mlflow`` settings."""
        mlflow = settings.mlflow
        return cls(
            home=settings.home,
            tracking_uri=mlflow.tracking_uri,
            experiment_name=mlflow.experiment_name,
        )

    @classmethod
    def current(cls) -> Workspace:
        """This process's, resolved from conf/config.yaml as a training resolves it (its
        environment variables: VISION_TRAINER_HOME, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME),
        without composing the whole config (the management verbs answer in a fraction of a
        second)."""
        from omegaconf import OmegaConf

        from trainer import CONF_DIR

        config = OmegaConf.load(CONF_DIR / "config.yaml")
        return cls(
            home=str(config.home),
            tracking_uri=str(config.mlflow.tracking_uri),
            experiment_name=str(config.mlflow.experiment_name),
        )
