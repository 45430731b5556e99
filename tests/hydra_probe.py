"""A Hydra callback for tests: records each job's return value, as a sweeper would read it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class RecordReturn(Callback):
    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        out = Path(os.environ["RECORD_RETURN_FILE"])
        with out.open("a") as handle:
            value = job_return.return_value if job_return.status.name == "COMPLETED" else None
            handle.write(json.dumps({"return_value": value}) + "\n")
