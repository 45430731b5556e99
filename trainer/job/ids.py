"""A detached training is told, through these variables, the IDs its launcher already printed."""

OPERATION_ID_ENV = "TRAINER_OPERATION_ID"
MODEL_ID_ENV = "TRAINER_MODEL_ID"
