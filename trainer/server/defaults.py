"""conf/serve.yaml: the one place the API server's and the model servers' defaults live."""

from __future__ import annotations

import functools
from typing import Any

from trainer import CONF_DIR


@functools.cache
def serve_defaults() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((CONF_DIR / "serve.yaml").read_text())
