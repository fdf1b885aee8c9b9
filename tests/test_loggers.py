"""Metric loggers (poa_hpc/train/loggers/) and the log line's smoother/ETA (poa_hpc/train/progress.py).

The loggers are the real packages, no network: W&B in offline mode (read back from its own
``.wandb`` files), MLflow on a local SQLite store (read back with MlflowClient), TensorBoard's event
files (read back with its EventAccumulator).  A run is SIGKILLed after its checkpoint and resumed: each
backend must hold one run whose steps appear once each."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poa_hpc.config import load_config
from poa_hpc.errors import ConfigError
from poa_hpc.train.progress import StepClock, format_duration, log_line
from tests.runs import ENV, RUN, metrics, train, train_cmd

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def wandb_history(path: Path):
    """The history rows of a ``.wandb`` file (W&B's LevelDB-log framing of protobuf ``Record``s)."""
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, buf, chunks, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        part, pos = data[pos:pos + n], pos + n
        if kind == 1:
            chunks.append(part)
        elif kind == 2:
            buf = part
        elif kind == 3:
            buf += part
        elif kind == 4:
            chunks.append(buf + part)
    rows = []
    for c in chunks:
        r = wandb_pb.Record()
        r.ParseFromString(c)
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def kill_when_logged(out: Path, overrides, after_step: int):
    """Start a run; SIGKILL its process group once metrics.jsonl has ``after_step`` and W&B's file holds a step."""
    p = subprocess.Popen(train_cmd(out, 1, "none", overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env={**ENV, **os.environ}, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        f = out / "metrics.jsonl"
        done = f.exists() and any(json.loads(ln)["step"] >= after_step for ln in f.read_text().splitlines() if ln)
        if done and any(wandb_history(w) for w in out.glob("wandb/offline-run-*/run-*.wandb")):
            break
        if p.poll() is not None:
            pytest.fail("run ended before it could be killed:\n" + p.stdout.read()[-3000:])
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)


def loggers_run(tmp_path):
    out = tmp_path / "run"
    return out, [*RUN, "data.n_local=0", "optim.epochs=4", "train.checkpoint_every=3", "train.loggers=[jsonl,tensorboard,wandb,mlflow]",
                 "train.wandb.mode=offline", f"train.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "train.mlflow.experiment=poa-test"]


@pytest.mark.slow
def test_a_killed_and_resumed_run_is_one_run_with_each_step_once_in_every_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", "0.1")  # W&B writes its file every 0.1 s (15 s by default)
    out, ov = loggers_run(tmp_path)
    kill_when_logged(out, ov, after_step=4)
    killed = metrics(out)
    ids = json.loads((out / "loggers.json").read_text())
    killed_tb = sorted((out / "tensorboard").glob("events.*"))
    assert len(killed_tb) == 1 and killed[-1]["step"] >= 4
    final = train(out, 1, "none", *ov, resume=True)
    steps = list(range(16))
    assert [r["step"] for r in final] == steps
    assert json.loads((out / "loggers.json").read_text()) == ids  # the same logger runs continued

    # W&B: one offline folder per attempt, both of the one run id; each step once, in order.
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{ids['wandb']}.wandb" for f in files)
    first, second = (wandb_history(f) for f in files)
    got = [int(r["train/step"]) for r in first + second]
    assert len(got) == len(set(got)) and got == sorted(got), got
    # what the killed attempt's file holds is a prefix of the steps it logged (its last flush before
    # SIGKILL); the resumed attempt continues right after it: no gap, no step twice
    assert [int(r["train/step"]) for r in first] == list(range(len(first))) and 0 < len(first) <= len(killed)
    assert [int(r["train/step"]) for r in second] == steps[len(first):]
    keys = set().union(*final) - {"step"}
    by_step = {r["step"]: r for r in final}
    for r in first + second:
        ref = by_step[int(r["train/step"])]  # the killed attempt's timings (time/*) are its own
        assert set(r) - {"_step", "_runtime", "_timestamp", "train/step"} == set(ref) - {"step"} or r in first
        assert {k for k in r if not k.startswith(("_", "time/"))} == {k for k in ref if not k.startswith("time/")} - {
            "step"} | {"train/step"}
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # exact resume
    assert set(final[-1]) - {"step"} <= set(second[-1])

    # MLflow: one run in the experiment, the same id, every step once; the config as parameters.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("poa-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]] and runs[0].info.status == "FINISHED"
    hist = client.get_metric_history(ids["mlflow"], "loss")
    assert sorted(m.step for m in hist) == steps and len(hist) == len(steps)
    assert {m.step: m.value for m in hist} == pytest.approx({r["step"]: r["loss"] for r in final}, rel=1e-6)
    assert set(runs[0].data.metrics) == keys
    assert runs[0].data.params["train.seed"] == "0" and runs[0].data.params["optim.iters_per_epoch"] == "4"

    # TensorBoard: the resumed writer purged the killed attempt's steps past the checkpoint.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert len(list((out / "tensorboard").glob("events.*"))) == 2
    for tag in ("loss", "lr", "img_per_s"):
        tb = [e.step for e in acc.Scalars(tag)]
        assert tb == steps, (tag, tb)
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in final], rel=1e-6)


def test_a_missing_logger_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    from poa_hpc.train.loggers import build_loggers, check_available

    for name, extra in (("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as when the package is absent
        cfg = load_config("configs/demo_cpu.yaml", [f"train.loggers=[{name}]", f"train.output_dir={tmp_path}"])
        with pytest.raises(ConfigError, match=rf"pip install 'poa_hpc\[{extra}\]'") as e:
            build_loggers(cfg, tmp_path, 0, resume=False)
        assert "\n" not in str(e.value)
        with pytest.raises(ConfigError, match=rf"pip install 'poa_hpc\[{extra}\]'"):
            check_available(cfg)  # on every rank, before training
    with pytest.raises(ConfigError, match="train.loggers.*'neptune'"):
        load_config(None, ["train.loggers=[jsonl,neptune]"])


def test_the_config_names_the_registered_loggers_and_maps_train_tensorboard():
    from poa_hpc.config import _LOGGERS  # the schema's list must be the registry's
    from poa_hpc.train.loggers import load_all, logger_names, selected

    load_all()
    assert sorted(_LOGGERS) == logger_names()
    assert selected(load_config(None, ["train.tensorboard=true"])) == ["jsonl", "tensorboard"]
    assert selected(load_config(None, ["train.loggers=[mlflow]"])) == ["jsonl", "mlflow"]


def test_the_step_time_smoother_eta_and_log_line_by_hand():
    clock = StepClock(start_step=10, end_step=110, beta=0.5, now=100.0)
    assert clock.step_s is None and clock.eta_s(10) is None
    clock.tick(4.0)  # ema 2.0, debiased 2.0 / (1 - 0.5) = 4
    assert clock.step_s == pytest.approx(4.0)
    clock.tick(30.0, regular=False)  # a checkpoint step: ignored
    assert clock.step_s == pytest.approx(4.0)
    clock.tick(2.0)  # ema 0.5 * 2 + 0.5 * 2 = 2.0, debiased 2.0 / 0.75 = 8/3
    assert clock.step_s == pytest.approx(8 / 3)
    clock.tick(1.0)  # ema 1.0 + 0.5 = 1.5, debiased 1.5 / 0.875 = 12/7
    assert clock.step_s == pytest.approx(12 / 7)
    assert clock.eta_s(13) == pytest.approx(97 * 12 / 7)
    assert clock.eta_s(200) == 0
    assert clock.elapsed_s(now=251.0) == pytest.approx(151.0)
    assert format_duration(151) == "0:02:31" and format_duration(97_385) == "27:03:05" and format_duration(None) == "-"
    line = log_line(634, 1210, 151.2, 137.4, 7.6852, 6.6e-4, "48x4", 221.3, 0.413)
    assert line == ("step 635/1210 (52%)  elapsed 0:02:31  eta 0:02:17  loss 7.69  lr 6.6e-04  sub 48x4  "
                    "img/s 221 (smoothed)  mfu 41%")
    assert log_line(0, 10, 0.1, None, 8.0, 0.0, "48x3", None).endswith("eta -  loss 8.00  lr 0.0e+00  sub 48x3  img/s -")
