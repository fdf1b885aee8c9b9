"""``mlflow``: MLflow (``train.mlflow``: tracking_uri, experiment).  The run id is kept in
``<run>/loggers.json`` and every attempt of the run continues that MLflow run; the config is
logged once as its parameters (flattened dotted keys)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict

from poa_hpc.errors import ConfigError
from poa_hpc.train.loggers import Logger, missing_extra, register_logger


@register_logger("mlflow")
class MlflowLogger(Logger):
    def open(self, cfg, run_dir: Path, start_step: int, run_id=None):
        try:
            import mlflow  # noqa: F401
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing_extra("mlflow", "mlflow") from None

        from mlflow.exceptions import MlflowException

        self._metric = Metric
        m = cfg.train.mlflow
        try:
            return self._open(MlflowClient, Param, m, cfg, run_dir, run_id)
        except MlflowException as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"key 'train.mlflow.tracking_uri': MLflow at {m.tracking_uri or '(default)'!r} "
                              f"failed: {msg}") from None

    def _open(self, MlflowClient, Param, m, cfg, run_dir, run_id):
        from poa_hpc.config import flatten, to_dict

        self.client = MlflowClient(tracking_uri=m.tracking_uri or None)
        if run_id is None:
            exp = self.client.get_experiment_by_name(m.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(m.experiment)
            run = self.client.create_run(exp_id, run_name=Path(run_dir).resolve().name)
            run_id = run.info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(to_dict(cfg)).items())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
                self.client.log_batch(run_id, params=params[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        return run_id

    def logged_through(self):
        steps = [m.step for m in self.client.get_metric_history(self.run_id, "loss")]
        return max(steps) if steps else -1

    def log(self, record: Dict[str, float]) -> None:
        step, ts = int(record["step"]), int(time.time() * 1000)
        metrics = [self._metric(k, float(v), ts, step) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float))]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
