"""``jsonl``: one JSON object per logged step in ``<run>/metrics.jsonl`` (always on; ``poa plot`` reads it)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict

from poa_hpc.errors import OutputWriteError
from poa_hpc.train.loggers import Logger, register_logger


@register_logger("jsonl")
class JsonlLogger(Logger):
    def open(self, cfg, run_dir: Path, start_step: int, run_id=None):
        self.path = path = Path(run_dir) / "metrics.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():  # drop what a killed attempt logged after the checkpoint this one resumes from
                kept = []
                for ln in path.read_text().splitlines():
                    try:
                        if ln.strip() and json.loads(ln)["step"] < start_step:
                            kept.append(ln)
                    except (ValueError, KeyError):  # a line torn by the kill
                        continue
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(ln + "\n" for ln in kept))
                os.replace(tmp, path)
            self.f = path.open("a")
            # where each attempt started (poa plot marks the requeues/restarts)
            with (path.parent / "attempts.jsonl").open("a") as f:
                f.write(json.dumps({"start_step": start_step, "resumed": start_step > 0,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        except OSError as exc:
            raise OutputWriteError(f"the metrics log '{path}' could not be written: {exc}") from None
        return None

    def log(self, record: Dict[str, float]) -> None:
        try:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        except OSError as exc:
            raise OutputWriteError(f"the metrics log '{self.path}' could not be written: {exc}") from None

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass
