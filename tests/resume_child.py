"""Child process for test_resume: trains a tiny run, logging every finished block write.
With KILL_BLOCK set, it writes part of that block, drops a marker, and waits to be killed."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_run  # noqa: E402

import datalens.core.store as st  # noqa: E402
from datalens.training.runs import train_subset_models  # noqa: E402

store_url, log, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
kill_block = int(os.environ.get("KILL_BLOCK", "-1"))
real_write = st.SubsetStore.write_block


def write_block(self, block, values, rows=None):
    if block == kill_block:
        start, stop = self.block_range(block)
        self.group["masks"][start:stop] = values["masks"]  # a partial write, then the crash
        marker.touch()
        time.sleep(120)
    real_write(self, block, values, rows)
    with open(log, "a") as fh:
        fh.write(f"{block}\n")


st.SubsetStore.write_block = write_block
train_subset_models(tiny_run(store_url, num_models=20), progress=False)
