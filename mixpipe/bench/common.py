"""What every benchmark records beside its numbers, so a result can be judged later."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict

__all__ = ["machine_info", "write_json", "git_hash", "write_and_print"]


def git_hash() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> Dict[str, Any]:
    """CPU, memory, accelerator and library versions of the machine the benchmark ran on."""
    info: Dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_hash(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    for module in ("numpy", "torch", "nvidia.dali", "ffcv", "zmq", "numba"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            info[f"version_{module}"] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - an absent optional library is just recorded as such
            info[f"version_{module}"] = None
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["cuda"] = None
    return info


def write_json(path: str, payload: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def write_and_print(out: str, payload: Dict[str, Any], datasets: Dict[str, Any], notes: list,
                    table) -> None:
    """Write the JSON, then print one ``table(name, result)`` per dataset and the notes."""
    write_json(out, payload)
    for key, result in datasets.items():
        print(table(key, result))
        print()
    for note in notes:
        print("note:", note)
    print(f"wrote {out}")
