"""Executors: where block jobs run.

* ``LocalExecutor`` runs them in-process, in order (the default; no start-up cost).
* ``RayExecutor`` fans them out as Ray tasks, on a local Ray instance or a cluster.
  A task whose worker dies (OOM, SIGKILL, a lost node) is retried up to
  ``max_retries`` times. Results reach the driver only as small summaries: every
  task writes its block straight into the store, whose chunks align with blocks,
  so workers never collide and a retried task rewrites identical values.

``make_executor`` builds the one the ``execution`` params name.
"""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, Callable, Iterable, Iterator


class BlockJobError(RuntimeError):
    """A block job failed; the message names the models it concerned."""


class LocalExecutor:
    """Runs each job in this process, in order."""

    def map_unordered(self, fn: Callable[..., Any], jobs: Iterable[tuple], describe: Callable[[tuple], str] = repr) -> Iterator[Any]:
        for args in jobs:
            try:
                yield fn(*args)
            except Exception as exc:
                raise BlockJobError(f"job for {describe(args)} failed: {type(exc).__name__}: {exc}") from exc


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast, naming the param, when a cluster address does not answer."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"execution.address={address!r} is not allowed; use local, auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(
            f"execution.address={address!r}: no Ray cluster answers there ({exc}). Start one with "
            "`ray start --head` on the head node, or set execution.address to local."
        ) from None


class RayExecutor:
    """Runs jobs as Ray tasks with the given resources per task.

    address: ``local`` (start a private Ray instance), ``auto`` (join the cluster that
    ``ray start`` made on this machine), or ``host:port`` / ``ray://host:port``.
    """

    def __init__(self, address: str = "local", num_cpus_per_task: float = 1, num_gpus_per_task: float = 0,
                 max_retries: int = 3, num_cpus: int | None = None, connect_timeout: float = 10.0):
        import ray

        self.options = {"num_cpus": num_cpus_per_task, "num_gpus": num_gpus_per_task, "max_retries": max_retries}
        ray_reachable(address, connect_timeout)
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address == "local":
            ray.init(num_cpus=num_cpus, **kwargs)
            return
        ray.init(address=address, **kwargs)

    def map_unordered(self, fn: Callable[..., Any], jobs: Iterable[tuple], describe: Callable[[tuple], str] = repr) -> Iterator[Any]:
        import ray

        remote = ray.remote(**self.options)(fn)
        pending = {remote.remote(*args): args for args in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                args = pending.pop(done[0])
                try:
                    yield ray.get(done[0])
                except Exception as exc:
                    cause = getattr(exc, "cause", None) or exc
                    raise BlockJobError(f"Ray task for {describe(args)} failed: {type(cause).__name__}: {cause}") from exc
        finally:
            for ref in pending:  # on error or interrupt, do not leave work running
                ray.cancel(ref, force=True)


def ray_reachable(address: str, timeout: float = 2.0) -> None:
    """Raise (ValueError or ConnectionError, one line naming ``execution.address``) unless Ray
    can start or join there: ``local`` always can; ``auto`` needs ``RAY_ADDRESS`` or a cluster
    that ``ray start`` made on this machine; ``host:port`` must answer."""
    if address == "local":
        return
    if address == "auto":
        if not os.environ.get("RAY_ADDRESS") and not _local_cluster_exists():
            raise ConnectionError("execution.address='auto' but no Ray cluster runs on this machine; "
                                  "start one with `ray start --head`, or set execution.address to local")
        return
    _check_reachable(address, timeout)


def _local_cluster_exists() -> bool:
    return os.path.exists(os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster"))


def make_executor(execution: dict):
    """The executor named by ``execution.backend`` (``local`` or ``ray``); every key of the
    ``execution`` section is required."""
    backend = execution["backend"]
    if backend == "local":
        return LocalExecutor()
    if backend == "ray":
        return RayExecutor(address=execution["address"], num_cpus_per_task=execution["num_cpus_per_task"],
                           num_gpus_per_task=execution["num_gpus_per_task"], max_retries=execution["max_retries"])
    raise ValueError(f"execution.backend={backend!r} is unknown; allowed values: local, ray")
