"""`python -m trainer`: training through Hydra."""

from __future__ import annotations

import sys


def main() -> None:
    from trainer.settings import check_overrides

    check_overrides(sys.argv[1:])
    from trainer.app import train_job

    train_job()


if __name__ == "__main__":
    main()
