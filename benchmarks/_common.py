"""Shared helpers for benchmarks: params of the embedded profile and JSON output."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def cpu_info() -> dict:
    """The CPU model and the instruction-set flags that decide which kernels are fast here
    (a speed-up that only one CPU shows is not a result)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = {"amx": ("amx_tile", "amx_bf16", "amx_int8"), "avx512_vnni": ("avx512_vnni",), "avx512_bf16": ("avx512_bf16",),
              "avx_vnni": ("avx_vnni",), "avx512f": ("avx512f",), "avx2": ("avx2",)}
    return {"model": model, "flags": {name: all(f in flags for f in fs) for name, fs in wanted.items()},
            "torch_vnni": bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())}


def write_result(name: str, result: dict, directory: Path | None = None) -> Path:
    """``directory/NAME.json`` (default ``reports/bench/``), with this machine's facts added."""
    result = {**result, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "cpu": cpu_info()}}
    out = Path(directory or ROOT / "reports" / "bench") / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(f"cpu: {result['machine']['cpu']['model']} {result['machine']['cpu']['flags']}")
    print(f"wrote {out}")
    return out
