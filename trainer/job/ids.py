"""A training started by another process (a detached one, a sweep's trial) is told, through these
variables, the IDs its launcher already printed or chose."""

OPERATION_ID_ENV = "TRAINER_OPERATION_ID"
MODEL_ID_ENV = "TRAINER_MODEL_ID"
# A sweep's trial: the sweep's MLflow run, which the trial's run names as its parent.
PARENT_RUN_ENV = "TRAINER_PARENT_RUN_ID"
