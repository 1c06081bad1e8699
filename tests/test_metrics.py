"""MetricsWriter: JSON lines and TensorBoard events, fresh and resumed, one process writing."""

import json
import struct

from tensorboardX.proto import event_pb2

from minigpt_jax.metrics import EVENTS_GLOB, MetricsWriter


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
