"""MetricsWriter: JSON lines and TensorBoard events, fresh and resumed, one process writing."""

import json
import struct
import time

import pytest

from tensorboardX.proto import event_pb2

from minigpt_jax.support.metrics import EVENTS_GLOB, MetricsWriter


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _steps(records, kind):
  return [r["step"] for r in records if r["kind"] == kind]


def _events(path):
  """Yields the Event protos of one file (TFRecord: length, crc, data, crc)."""
  data = path.read_bytes()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    offset += 12
    yield event_pb2.Event.FromString(data[offset:offset + length])
    offset += length + 4


def _tensorboard_view(workdir):
  """{tag: {step: value}} as TensorBoard shows it, and how often each step was seen.

  Files are read in name order. A START session log at step S hides the points
  read so far at steps >= S, as TensorBoard's EventAccumulator does on restart.
  """
  shown, seen = {}, {}
  for path in sorted(workdir.glob(EVENTS_GLOB)):
    for event in _events(path):
      if event.session_log.status == event_pb2.SessionLog.START:
        for points in shown.values():
          for step in [s for s in points if s >= event.step]:
            del points[step]
      for value in event.summary.value:
        point = value.simple_value if value.WhichOneof("value") == "simple_value" else (
            value.tensor.string_val[0].decode())
        if event.step in shown.setdefault(value.tag, {}):
          seen[value.tag, event.step] = seen.get((value.tag, event.step), 1) + 1
        shown[value.tag][event.step] = point
  return shown, seen


def _run(writer, steps, run_id):
  """What the train loop writes: train records every 10 steps, evals every 20."""
  for step in steps:
    if step % 10 == 0 and step > 0:
      writer.write("train", step, loss=run_id + step / 1000, learning_rate=1e-3,
                   steps_per_s=50.0, tokens_per_s=6400.0, wall_s=step / 50)
    if step % 20 == 0:
      writer.write("eval", step, train_loss=run_id + step / 1000,
                   val_loss=run_id + step / 500, wall_s=step / 50)


def test_fresh_run_writes_json_lines_tags_and_logs_only_evals(tmp_path):
  lines = []
  with MetricsWriter(tmp_path, log=lines.append) as writer:
    _run(writer, range(41), run_id=1)
    writer.write_text("sample", 40, "THE PASTURE\n  I'm going out")
  records = _records(tmp_path)
  assert _steps(records, "train") == [10, 20, 30, 40]
  assert _steps(records, "eval") == [0, 20, 40]
  assert records[0] == {"kind": "eval", "step": 0, "train_loss": 1.0, "val_loss": 1.0,
                        "wall_s": 0.0}
  assert lines == ["step 0: train_loss 1.0000, val_loss 1.0000, wall_s 0.0000",
                   "step 20: train_loss 1.0200, val_loss 1.0400, wall_s 0.4000",
                   "step 40: train_loss 1.0400, val_loss 1.0800, wall_s 0.8000"]
  shown, _ = _tensorboard_view(tmp_path)
  for tag in ("train/loss", "train/learning_rate", "train/steps_per_s", "train/tokens_per_s",
              "train/wall_s"):
    assert sorted(shown[tag]) == [10, 20, 30, 40], tag
  for tag in ("eval/train_loss", "eval/val_loss", "eval/wall_s"):
    assert sorted(shown[tag]) == [0, 20, 40], tag
  assert abs(shown["eval/val_loss"][40] - 1.08) < 1e-6
  assert "    I'm going out" in shown["sample/text_summary"][40]


def test_resume_neither_duplicates_nor_loses_steps(tmp_path):
  killed = MetricsWriter(tmp_path, log=lambda _: None)
  _run(killed, range(71), run_id=1)  # killed at step 70; last checkpoint at step 40
  killed.flush()
  with MetricsWriter(tmp_path, resume_step=40, log=lambda _: None) as writer:
    _run(writer, range(41, 101), run_id=2)

  records = _records(tmp_path)
  assert _steps(records, "train") == list(range(10, 101, 10))
  assert _steps(records, "eval") == list(range(0, 101, 20))
  assert {r["step"]: int(r["loss"]) for r in records if r["kind"] == "train"} == {
      **{s: 1 for s in range(10, 41, 10)}, **{s: 2 for s in range(50, 101, 10)}}

  assert len(list(tmp_path.glob(EVENTS_GLOB))) == 2  # the killed run's file is kept
  shown, seen = _tensorboard_view(tmp_path)
  assert sorted(shown["train/loss"]) == list(range(10, 101, 10))
  assert sorted(shown["eval/val_loss"]) == list(range(0, 101, 20))
  assert {s: int(v) for s, v in shown["train/loss"].items()} == {
      **{s: 1 for s in range(10, 41, 10)}, **{s: 2 for s in range(50, 101, 10)}}
  assert not seen, f"steps written twice without a purge between: {seen}"


def test_a_fresh_run_discards_an_old_runs_files(tmp_path):
  with MetricsWriter(tmp_path, log=lambda _: None) as writer:
    _run(writer, range(61), run_id=1)
  with MetricsWriter(tmp_path, log=lambda _: None) as writer:
    _run(writer, range(21), run_id=2)
  assert _steps(_records(tmp_path), "eval") == [0, 20]
  assert len(list(tmp_path.glob(EVENTS_GLOB))) == 1
  shown, _ = _tensorboard_view(tmp_path)
  assert shown["eval/val_loss"] == {0: 2.0, 20: 2.0399999618530273}


def test_a_disabled_writer_writes_and_deletes_nothing(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "step": 0}\n')
  lines = []
  writer = MetricsWriter(tmp_path, log=lines.append, enabled=False)
  _run(writer, range(41), run_id=1)
  writer.write_text("sample", 40, "text")
  writer.close()
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
  assert len(_records(tmp_path)) == 1 and not lines


def test_writes_after_close_are_ignored(tmp_path):
  writer = MetricsWriter(tmp_path, log=lambda _: None)
  writer.write("eval", 0, val_loss=4.0)
  writer.close()
  writer.write("eval", 10, val_loss=3.0)
  writer.close()
  assert _steps(_records(tmp_path), "eval") == [0]


def _wandb_records(run_dir):
  """The Record protos of an offline W&B run file (LevelDB-log blocks of 32 KiB)."""
  from wandb.proto import wandb_internal_pb2
  (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
  data, i, chunk = path.read_bytes(), 7, b""  # after the ":W&B" header
  assert data[:4] == b":W&B"
  while i + 7 <= len(data):
    left = 32768 - i % 32768
    _, length, kind = struct.unpack_from("<IHB", data, i) if left >= 7 else (0, 0, 0)
    if kind == 0:  # a block's zero padding
      i += left
      continue
    chunk, i = chunk + data[i + 7:i + 7 + length], i + 7 + length
    if kind in (1, 4):  # a whole record, or a record's last piece
      yield wandb_internal_pb2.Record.FromString(chunk)
      chunk = b""


def test_a_run_logs_its_config_scalars_and_sample_to_wandb_offline_and_tensorboard(
    tiny_config, tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  from minigpt_jax import loop
  from minigpt_jax.tools import finish
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.delenv("WANDB_DIR", raising=False)
  tiny_config.metrics.wandb_project = "minigpt-test"
  tiny_config.train.steps = 20
  lines = []
  loop.train_and_evaluate(tiny_config, tmp_path, log=lines.append, show_progress=False,
                          on_end=lambda end: finish.plot_and_sample(end, 20))
  assert any(line.startswith("logging to W&B project minigpt-test") for line in lines)
  for _ in range(120):  # W&B's service may still be writing the file after finish() returns
    records = list(_wandb_records(tmp_path))
    if any(r.WhichOneof("record_type") == "exit" for r in records):
      break
    time.sleep(0.5)
  (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  config = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert run.project == "minigpt-test" and config["model"]["n_embed"] == 32
  # Each launch joins the workdir's group; this first one is a train job, a resume a resume job.
  assert (run.run_group, run.job_type) == (tmp_path.name, "train")
  history = [{".".join(i.nested_key) or i.key: i.value_json for i in r.history.item}
             for r in records if r.WhichOneof("record_type") == "history"]
  evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "eval"]
  logged = {int(h["_step"]): h for h in history}
  assert sorted(logged) == [0, 10, 20]  # evals at 0, 10 (log_every), 20
  for record in evals:
    assert json.loads(logged[record["step"]]["eval/val_loss"]) == record["val_loss"]
  assert "train/loss" in logged[10] and "sample._type" in logged[20]
  summary = {u.key: json.loads(u.value_json) for r in records
             if r.WhichOneof("record_type") == "summary" for u in r.summary.update if u.key}
  assert len(summary["sample_text"]) == 20
  shown, _ = _tensorboard_view(tmp_path)
  assert '"n_embed": 32' in shown["config/text_summary"][0]


def test_asking_for_wandb_without_the_package_is_one_error_naming_the_install(
    tiny_config, monkeypatch):
  import importlib.util
  from minigpt_jax import config as config_lib
  from minigpt_jax.errors import UserError
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else find_spec(name, *a))
  tiny_config.metrics.wandb_project = "p"
  with pytest.raises(UserError, match=r"wandb is not installed; pip install 'wandb>=0.31"):
    config_lib.validate(tiny_config)
