"""``tensorboard``: scalars in ``<run>/tensorboard``; a resumed attempt purges the steps past its
checkpoint (``SummaryWriter(purge_step=...)``), so TensorBoard shows each step once."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from poa_hpc.train.loggers import Logger, missing_extra, register_logger


@register_logger("tensorboard")
class TensorBoardLogger(Logger):
    def open(self, cfg, run_dir: Path, start_step: int, run_id=None):
        try:
            import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_extra("tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step if start_step > 0 else None)
        return None

    def log(self, record: Dict[str, float]) -> None:
        step = int(record["step"])
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
