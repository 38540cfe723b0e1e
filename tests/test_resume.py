import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from conftest import tiny_run
from datalens.core.store import open_existing
from datalens.training.runs import train_subset_models

CHILD = Path(__file__).parent / "resume_child.py"


def _child(store, log, marker, kill_block=None):
    env = {**os.environ, "KILL_BLOCK": str(kill_block if kill_block is not None else -1)}
    return subprocess.Popen([sys.executable, str(CHILD), str(store), str(log), str(marker)], env=env)


def test_sigkill_mid_block_then_rerun_completes_each_model_once(tmp_path):
    store, log, marker = tmp_path / "s.zarr", tmp_path / "writes.log", tmp_path / "killed_here"
    proc = _child(store, log, marker, kill_block=2)
    deadline = time.monotonic() + 600  # a hang guard, not a speed bound
    while not marker.exists():
        assert proc.poll() is None, "child exited before reaching the block to kill"
        assert time.monotonic() < deadline, "child never reached the block to kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = open_existing(str(store)).completed()
    assert partial[:8].all() and not partial[8:].any()  # blocks 0, 1 done; block 2 was cut mid-write

    assert _child(store, log, marker).wait() == 0
    writes = Counter(int(line) for line in log.read_text().split())
    assert writes == Counter({b: 1 for b in range(5)})  # every block exactly once, none lost

    reference = train_subset_models(tiny_run(tmp_path / "ref.zarr", num_models=20), progress=False)
    resumed = open_existing(str(store))
    assert resumed.completed().all()
    for name in ("masks", "test_outputs", "train_outputs"):
        np.testing.assert_allclose(resumed.read(name), reference.read(name), rtol=1e-6, atol=1e-6)
