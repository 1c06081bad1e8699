"""Eval-only (minigpt_jax/tools/evaluate.py, launch/evaluate.py): a checkpoint's loss without training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error, tiny
from minigpt_jax import data, loop
from minigpt_jax.tools import evaluate
from minigpt_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny frost_cpu run of 40 steps, evaluated at 0, 20 and 40 (checkpoints at 20 and 40)."""
  from configs import frost_cpu
  config = tiny(frost_cpu.get_config())
  config.model.dropout = 0.1
  workdir = tmp_path_factory.mktemp("evaluate") / "run"
  loop.train_and_evaluate(config, workdir, show_progress=False)
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  evals = {r["step"]: r for r in map(json.loads, lines) if r["kind"] == "eval"}
  return workdir, evals


def _fields(record):
  return {k: record[k] for k in ("train_loss", "val_loss", "train_bpc", "val_bpc")}


def test_the_latest_and_an_earlier_step_give_the_runs_own_eval_records(run):
  workdir, evals = run
  latest = evaluate.evaluate(workdir)
  assert latest["step"] == 40 and latest["eval_iters"] == 4 and latest["text"] == "frost"
  assert _fields(latest) == _fields(evals[40])  # the same batches, the same numbers
  assert _fields(evaluate.evaluate(workdir, step=20)) == _fields(evals[20])
  best_step = min((20, 40), key=lambda s: evals[s]["val_loss"])
  assert evaluate.evaluate(workdir, best=True)["step"] == best_step
  more = evaluate.evaluate(workdir, eval_iters=8)  # more batches: another estimate
  assert more["eval_iters"] == 8 and more["val_loss"] != latest["val_loss"]
  assert abs(more["val_loss"] - latest["val_loss"]) < 0.5


def test_any_text_with_the_checkpoints_vocabulary(run, tmp_path):
  workdir, evals = run
  text = data.read_text(data.resolve_corpus("frost"))
  path = tmp_path / "poem.txt"
  path.write_text(text[-3000:])  # from the val split
  result = evaluate.evaluate(workdir, path=path)
  assert set(result) >= {"text_loss", "text_bpc"} and "val_loss" not in result
  assert result["tokens_per_char"] == 1.0  # characters are the tokens
  assert abs(result["text_loss"] - evals[40]["val_loss"]) < 0.5
  assert result["text_bpc"] == round(result["text_loss"] / 0.6931471805599453, 4)


@pytest.mark.parametrize("kwargs, needle", [
    ({"step": 20, "best": True}, "--step and --best"),
    ({"step": 30}, "no checkpoint at step 30"),
    ({"eval_iters": 0}, "--eval_iters is 0"),
])
def test_bad_requests_are_one_user_error(run, kwargs, needle):
  with pytest.raises(UserError, match=needle):
    evaluate.evaluate(run[0], **kwargs)


def test_text_outside_the_vocabulary_or_too_short_is_one_user_error(run, tmp_path):
  (tmp_path / "emoji.txt").write_text("THE ROAD \N{SNOWFLAKE} NOT TAKEN\n" * 10)
  with pytest.raises(UserError, match="emoji.txt cannot be encoded with the checkpoint's"):
    evaluate.evaluate(run[0], path=tmp_path / "emoji.txt")
  (tmp_path / "short.txt").write_text("THE ROAD\n")
  with pytest.raises(UserError, match="not more than the model's block_size"):
    evaluate.evaluate(run[0], path=tmp_path / "short.txt")


def test_the_launcher_prints_json_on_stdout_and_one_error_line(run, tmp_path):
  workdir, evals = run
  result = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "evaluate.py"), f"--workdir={workdir}",
       "--step=20"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert _fields(json.loads(result.stdout)) == _fields(evals[20])
  assert "step 20 of" in result.stderr and "val loss" in result.stderr
  bad = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "evaluate.py"), f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert_one_line_error(bad, "no checkpoints in")
