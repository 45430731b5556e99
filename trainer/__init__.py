"""vision-trainer: budgeted training of torchvision models, the AutoML way (see README.md)."""

from pathlib import Path

# The Hydra tree: model types, bounds and defaults live there, nowhere else.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
