"""Shared helpers for benchmarks: params of the embedded profile and JSON output."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def write_result(name: str, result: dict) -> Path:
    result = {**result, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}}
    out = ROOT / "reports" / "bench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(f"wrote {out}")
    return out
