"""Loss plots from hand-written run folders: the library and launch/plot.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from conftest import assert_one_line_error
from minigpt_jax.tools import plotting
from minigpt_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(workdir, model, corpus="frost", steps=600, final=2.0):
  """A run folder as training leaves it: config.json and metrics.jsonl, evals every 100."""
  workdir.mkdir(parents=True)
  config = {"model": {"name": model, "block_size": 32, "n_embed": 64, "n_heads": 4,
                      "n_layer": 4},
            "data": {"corpus": corpus, "path": ""}}
  (workdir / "config.json").write_text(json.dumps(config))
  lines = []
  for step in range(0, steps + 1, 50):
    loss = final + (math.log(65) - final) * math.exp(-step / 150)
    if step:
      lines.append({"kind": "train", "step": step, "loss": loss + 0.05 * (-1) ** (step // 50)})
    if step % 100 == 0:
      lines.append({"kind": "eval", "step": step, "train_loss": loss, "val_loss": loss + 0.03,
                    "wall_s": step / 20})
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines)
                                          + '{"kind": "train", "st')  # cut short by a kill
  return workdir


def _check_png(path):
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC
  assert 10_000 < len(data) < 200_000, len(data)
  assert imread(path).shape[:2] == (450, 800)  # 8 x 4.5 in at 100 dpi


def test_two_runs_overlaid_in_a_small_png(tmp_path):
  runs = [_fake_run(tmp_path / "gpt_frost", "gpt"),
          _fake_run(tmp_path / "bigram_shake", "bigram", "shakespeare", steps=300, final=2.5)]
  out = plotting.plot_runs(runs, tmp_path / "plots" / "curves.png")
  assert out == tmp_path / "plots" / "curves.png"
  _check_png(out)


def test_runs_are_labelled_by_folder_config_and_final_val_loss(tmp_path):
  runs = [plotting.load_run(_fake_run(tmp_path / "a" / "run", "gpt")),
          plotting.load_run(_fake_run(tmp_path / "b" / "run", "bigram"))]
  assert runs[0].eval_steps == [0, 100, 200, 300, 400, 500, 600]
  assert runs[0].batch_steps == list(range(50, 601, 50))
  labels = plotting._labels(runs)
  assert labels[0].startswith(f"{tmp_path / 'a' / 'run'}: gpt 4L×64d, 4 heads, ctx 32, frost")
  assert labels[1].endswith("bigram, frost, val 2.070 @ 600")
  assert plotting.describe({"model": {"name": "bigram"},
                            "data": {"corpus": "frost", "path": "/x/poems.txt"}}) == (
                                "bigram, poems")


def test_a_sweep_folder_stands_for_its_started_runs_labelled_by_their_values(tmp_path):
  names = ["learning_rate=0.003,dropout=0", "learning_rate=0.001,dropout=0",
           "learning_rate=0.001,dropout=0.1"]
  (tmp_path / "s").mkdir()
  (tmp_path / "s" / "sweep.json").write_text(json.dumps({"runs": names}))
  for name in names[:2]:  # the third has not started
    _fake_run(tmp_path / "s" / name, "gpt")
  single = _fake_run(tmp_path / "single", "bigram")
  runs = plotting.expand_sweeps([tmp_path / "s", single])
  assert runs == [tmp_path / "s" / names[0], tmp_path / "s" / names[1], single]
  labels = plotting._labels([plotting.load_run(r) for r in runs])
  assert [label.split(":")[0] for label in labels] == names[:2] + ["single"]
  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "sweep.json").write_text(json.dumps({"runs": ["a=1"]}))
  with pytest.raises(UserError, match="has no run with metrics yet"):
    plotting.expand_sweeps([tmp_path / "t"])


def test_save_loss_plot_writes_loss_png_in_the_workdir(tmp_path):
  workdir = _fake_run(tmp_path / "run", "gpt")
  assert plotting.save_loss_plot(workdir) == workdir / "loss.png"
  _check_png(workdir / "loss.png")


def test_unplottable_folders_name_the_folder_and_the_fix(tmp_path):
  with pytest.raises(UserError, match="no such run folder"):
    plotting.plot_runs([tmp_path / "missing"], tmp_path / "c.png")
  with pytest.raises(UserError, match=f"{tmp_path} has no metrics.jsonl; train first"):
    plotting.plot_runs([tmp_path], tmp_path / "c.png")
  (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 50, "loss": 3.0}\n')
  with pytest.raises(UserError, match="has no eval records yet; train until"):
    plotting.plot_runs([tmp_path], tmp_path / "c.png")
  with pytest.raises(UserError, match=r"use a \.png, \.pdf or \.svg name"):
    plotting.plot_runs([_fake_run(tmp_path / "run", "gpt")], tmp_path / "c.xyz")
  assert not list(tmp_path.glob("c.*"))


def _plot_cli(*args):
  return subprocess.run([sys.executable, str(ROOT / "launch" / "plot.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_plot_cli_overlays_runs(tmp_path):
  runs = [_fake_run(tmp_path / "one", "gpt"), _fake_run(tmp_path / "two", "bigram")]
  result = _plot_cli(f"--workdir={runs[0]}", f"--workdir={runs[1]}",
                     f"--out={tmp_path / 'curves.png'}")
  assert result.returncode == 0, result.stderr
  assert result.stderr.strip().splitlines()[-1] == f"wrote {tmp_path / 'curves.png'} (2 runs)"
  _check_png(tmp_path / "curves.png")


def _empty_metrics(workdir):
  (workdir / "metrics.jsonl").write_text("")
  return workdir


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing", "no such run folder"),
    (_empty_metrics, "no eval records yet"),
])
def test_plot_cli_errors_are_one_line(tmp_path, make, expected):
  workdir = make(tmp_path)
  result = _plot_cli(f"--workdir={workdir}", f"--out={tmp_path / 'c.png'}")
  assert_one_line_error(result, expected)
  assert not (tmp_path / "c.png").exists()
