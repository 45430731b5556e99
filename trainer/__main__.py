"""`python -m trainer`: training through Hydra, or a management verb (models, operations,
predict, weights)."""

from __future__ import annotations

import sys

MANAGEMENT = (
    "models",
    "operations",
    "predict",
    "weights",
    "sweeps",
    "datasets",
    "serve",
    "--tracking-uri",
    "--experiment",
    "-h",
    "--help",
)


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in MANAGEMENT:
        from trainer.cli import run

        raise SystemExit(run(argv))
    from trainer.job.settings import check_overrides

    check_overrides(sys.argv[1:])
    from trainer.app import train_job

    train_job()


if __name__ == "__main__":
    main()
