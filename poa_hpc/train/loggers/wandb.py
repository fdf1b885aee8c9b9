"""``wandb``: Weights & Biases (``train.wandb``: project, entity, mode, tags).  Files go under
``<run>/wandb``; the run id is kept in ``<run>/loggers.json`` and every attempt of the run
continues it (``resume="allow"`` with that id; offline runs of one id are synced into one run)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Dict

from poa_hpc.train.loggers import Logger, missing_extra, register_logger


@register_logger("wandb")
class WandbLogger(Logger):
    def open(self, cfg, run_dir: Path, start_step: int, run_id=None):
        try:
            import wandb
        except ImportError:
            raise missing_extra("wandb", "wandb") from None
        from poa_hpc.config import flatten, to_dict

        w = cfg.train.wandb
        run_dir = Path(run_dir)
        self.resumed = run_id is not None
        self.offline_dir = run_dir / "wandb"
        earlier = sorted(self.offline_dir.glob(f"offline-run-*/run-{run_id}.wandb")) if run_id else []
        run_id = run_id or secrets.token_hex(6)
        self.run = wandb.init(project=w.project, entity=w.entity or None, mode=w.mode, tags=list(w.tags) or None,
                              id=run_id, resume="allow", dir=str(run_dir), name=run_dir.resolve().name,
                              config=flatten(to_dict(cfg)), settings=wandb.Settings(console="off", quiet=True))
        self.held = None
        if self.resumed:
            if w.mode == "offline":  # what the earlier attempts' files hold
                self.held = max([last_step(f) for f in earlier], default=-1)
            else:
                self.held = int(self.run.summary.get("train/step", -1))
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        return run_id

    def logged_through(self):
        return self.held

    def log(self, record: Dict[str, float]) -> None:
        step = int(record["step"])
        # W&B's own step must grow: the trainer's step is the x-axis (train/step) of every key
        self.run.log({"train/step": step, **{k: v for k, v in record.items() if k != "step"}})

    def close(self) -> None:
        self.run.finish()


def last_step(path: Path) -> int:
    """The largest ``train/step`` in a ``.wandb`` file (W&B's LevelDB-log framing of protobuf records;
    -1 if none, a torn tail is ignored)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    pos, buf, last, block = 7, b"", -1, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0 or pos + n > len(data):
            break
        part, pos = data[pos:pos + n], pos + n
        if kind in (2, 3):
            buf = part if kind == 2 else buf + part
            continue
        rec = pb.Record()
        try:
            rec.ParseFromString(buf + part if kind == 4 else part)
        except Exception:
            continue
        buf = b""
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:
                if (item.key or "/".join(item.nested_key)) == "train/step":
                    last = max(last, int(json.loads(item.value_json)))
    return last
