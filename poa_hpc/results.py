"""Benchmark and estimate results: the JSON every benchmark and estimator writes next to its rows (date, device, library versions, commit)."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["commit", "versions", "device_name", "write_result"]

_OPTIONAL = ("deepspeed", "triton", "xformers", "timm", "nvidia-dali-cuda120", "submitit")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def versions() -> Dict[str, str]:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for dist_name in _OPTIONAL:
        try:  # the installed version, without importing (DeepSpeed prints at import)
            v[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            pass
    return v


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_result(kind: str, rows: List[dict], out: str, extra: Optional[dict] = None,
                 device: Optional[str] = None) -> Path:
    """Write ``benchmarks/results/<kind>_<cuda|cpu>_<UTC time>.json`` and return its path."""
    import torch

    result = {"benchmark": kind, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device or device_name(), "versions": versions(), "commit": commit(), **(extra or {}),
              "rows": rows}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if torch.cuda.is_available() else "cpu"
    path = folder / f"{kind}_{tag}_{datetime.now(timezone.utc):%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path
