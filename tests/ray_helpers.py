"""Job functions for the Ray tests; importable by Ray workers (tests/ is put on their PYTHONPATH)."""
import os
import signal
from pathlib import Path

from datalens.training.runs import train_block


def die_once_then_train(marker: str, run, block: int):
    """The first attempt at block 1 kills its own worker process (SIGKILL); retries train normally."""
    if block == 1 and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return train_block(run, block)


def fail(run, block: int):
    raise RuntimeError("boom")
