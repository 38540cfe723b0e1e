"""A driver that trains a tiny run on its own local Ray instance; the test kills it with SIGKILL."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_run  # noqa: E402

from datalens.core.execution import RayExecutor  # noqa: E402
from datalens.training.runs import train_subset_models  # noqa: E402

train_subset_models(tiny_run(sys.argv[1], num_models=24, settings=tiny_run("x").settings.__class__(epochs=60)),
                    executor=RayExecutor("local", num_cpus=2), progress=False)
