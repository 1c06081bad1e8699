"""Sweeps: --sweep parsing, folder names, the results table (pure), and one tiny sweep run."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from conftest import assert_one_line_error
from minigpt_jax import config as config_lib
from minigpt_jax.tools import sweep
from minigpt_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _parse(*flags, config=None, overrides=()):
  return sweep.parse_sweeps(list(flags), config or config_lib.get_config(), overrides)


def test_values_parse_to_the_type_of_the_fields_default():
  sweeps = _parse("train.learning_rate=1e-3,3e-3", "model.n_layer=2,4", "seed=1",
                  "model.bias=true,False", "data.corpus=frost,shakespeare", "model.dropout=0")
  assert sweeps == [sweep.Sweep("train.learning_rate", (0.001, 0.003)),
                    sweep.Sweep("model.n_layer", (2, 4)), sweep.Sweep("seed", (1,)),
                    sweep.Sweep("model.bias", (True, False)),
                    sweep.Sweep("data.corpus", ("frost", "shakespeare")),
                    sweep.Sweep("model.dropout", (0.0,))]
  assert [type(v) for s in sweeps for v in s.values][:4] == [float, float, int, int]
  assert _parse("model.tie_embeddings=1,0")[0].values == (True, False)


@pytest.mark.parametrize("flag, message", [
    ("train.nope=1,2", r"--sweep=train.nope=1,2: no config field train.nope; check its spelling"),
    ("train.learning_rat=1", "did you mean train.learning_rate"),
    ("train=1", "train is a section of the config, not a field"),
    ("train.steps=10,ten", r"'ten' is not an int like config.train.steps \(5000\); give integers"),
    ("train.steps=1.5", "is not an int"),
    ("model.bias=yes", "give True or False"),
    ("model.dropout=0.1,abc", "is not a float"),
    ("model.dropout=0.1,0.10", "the value 0.1 is given twice"),
    ("train.learning_rate", r"write it as --sweep=SECTION.FIELD=v1,v2"),
])
def test_bad_flags_are_one_error_naming_the_flag(flag, message):
  with pytest.raises(UserError, match=message):
    _parse(flag)


def test_a_field_is_swept_once_and_not_also_overridden():
  with pytest.raises(UserError, match="seed is already swept by an earlier --sweep"):
    _parse("seed=1", "model.dropout=0", "seed=2")
  with pytest.raises(UserError, match="--config.train.steps also sets this field"):
    _parse("train.steps=10,20", overrides={"train.steps": 30})


def test_grid_order_names_and_configs():
  config = config_lib.get_config()
  runs = sweep.grid(config, _parse("train.learning_rate=1e-3,3e-3", "model.dropout=0,0.1"))
  assert [r.name for r in runs] == [
      "learning_rate=0.001,dropout=0", "learning_rate=0.001,dropout=0.1",
      "learning_rate=0.003,dropout=0", "learning_rate=0.003,dropout=0.1"]
  assert runs[2].describe() == "train.learning_rate=0.003 model.dropout=0"
  assert (runs[2].config.train.learning_rate, runs[2].config.model.dropout) == (0.003, 0.0)
  assert config.train.learning_rate == 1e-3 and runs[3].config.model.dropout == 0.1


def test_names_are_dotted_where_short_names_clash_and_filesystem_safe():
  config = ml_collections.ConfigDict({"a": {"lr": 0.1, "path": ""}, "b": {"lr": 1}})
  sweeps = sweep.parse_sweeps(["a.lr=1e-5", "b.lr=2", "a.path=/x/my poems.txt"], config)
  assert sweep.labels(sweeps) == ["a.lr", "b.lr", "path"]
  assert sweep.run_name(sweep.labels(sweeps), (1e-5, 2, "/x/my poems.txt")) == (
      "a.lr=1e-05,b.lr=2,path=_x_my_poems.txt")
  long = sweep.run_name(["path"], ["/data/" + "x" * 300])
  assert len(long) == 120 and long != sweep.run_name(["path"], ["/data/" + "x" * 301])


def test_a_bad_combination_fails_before_any_run():
  with pytest.raises(UserError, match=r"run model.dropout=1.5 of the sweep: config.model.dropout"):
    sweep.grid(config_lib.get_config(), _parse("model.dropout=0,1.5"))
  with pytest.raises(UserError, match="would share the folder path=a_b"):
    sweep.grid(config_lib.get_config(), _parse("data.path=a/b,a_b"))


def _runs(*values):
  config = config_lib.get_config()
  return sweep.grid(config, _parse("train.learning_rate=" + ",".join(map(str, values))))


def test_rows_sort_by_best_val_loss_with_missing_values_last():
  runs = _runs(1e-3, 3e-3, 1e-2, 3e-2)
  summaries = [
      {"step": 50, "best_val_loss": 2.5, "best_step": 40, "val_loss": 2.6, "wall_s": 3.0},
      None,  # failed or not run yet
      {"step": 50, "best_val_loss": 2.1, "best_step": 50, "val_loss": 2.1, "wall_s": 2.0,
       "val_bpc": 3.03, "best_val_bpc": 3.03},
      {"step": 50, "best_val_loss": float("nan"), "best_step": None, "val_loss": None},
  ]
  table = sweep.rows(list(zip(runs, summaries)))
  assert [r["folder"] for r in table] == [
      "learning_rate=0.01", "learning_rate=0.001", "learning_rate=0.003", "learning_rate=0.03"]
  assert list(table[0]) == ["train.learning_rate", "best_val_loss", "best_step", "val_loss",
                            "val_bpc", "best_val_bpc", "steps", "wall_s", "folder"]
  assert table[1]["val_bpc"] is None and table[3]["best_val_loss"] is None
  assert "val_bpc" not in sweep.rows(list(zip(runs[:1], summaries[:1])))[0]
  markdown = sweep.to_markdown(table).splitlines()
  assert markdown[0].startswith("| train.learning_rate | best_val_loss | best_step |")
  assert len(markdown) == 2 + 4
  assert markdown[2] == ("| 0.01 | 2.1000 | 50 | 2.1000 | 3.0300 | 3.0300 | 50 | 2 | "
                         "`learning_rate=0.01` |")
  assert markdown[3].count("n/a") == 2 and markdown[4].count("n/a") == 7


def test_sweep_json_is_claimed_once_and_a_different_sweep_is_refused(tmp_path):
  sweeps = _parse("train.learning_rate=1e-3,3e-3")
  runs = sweep.grid(config_lib.get_config(), sweeps)
  wanted = sweep.definition("configs/frost_cpu.py", sweeps, {"train.steps": 20}, runs)
  sweep.claim(tmp_path / "s", wanted)
  assert json.loads((tmp_path / "s" / "sweep.json").read_text()) == {
      "config": "configs/frost_cpu.py", "overrides": {"train.steps": 20},
      "runs": ["learning_rate=0.001", "learning_rate=0.003"],
      "sweeps": [{"field": "train.learning_rate", "values": [0.001, 0.003]}]}
  sweep.claim(tmp_path / "s", wanted)  # the same sweep again: fine
  other = sweep.definition("configs/frost_cpu.py", sweeps, {"train.steps": 30}, runs)
  with pytest.raises(UserError, match=r"holds a different sweep \(--config.train.steps=20 "
                     r"there, --config.train.steps=30 here\).*pass a new --workdir"):
    sweep.claim(tmp_path / "s", other)
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "metrics.jsonl").write_text("")
  with pytest.raises(UserError, match="holds a training run"):
    sweep.claim(tmp_path / "run", wanted)


def test_a_failed_run_is_one_line_the_others_go_on_and_a_rerun_retries_it(tmp_path,
                                                                         monkeypatch):
  def fake_train(config, workdir, on_end=None):  # what training leaves, without JAX work
    if config.train.learning_rate == 0.1:
      raise UserError("training diverged: loss nan at step 3")
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    (workdir / "metrics.jsonl").write_text(
        json.dumps({"kind": "eval", "step": 5, "train_loss": 2.0, "val_loss": 2.1}) + "\n")
    summary = {"step": 5, "train_loss": 2.0, "val_loss": 2.1, "best_val_loss": 2.1,
               "best_step": 5, "wall_s": 0.1, "steps_per_s": None}
    (workdir / "summary.json").write_text(json.dumps(summary))
    return summary

  monkeypatch.setattr(sweep.loop, "train_and_evaluate", fake_train)
  config = config_lib.get_config()
  config.train.steps = 5
  sweeps = _parse("train.learning_rate=1e-3,0.1,1e-2", config=config)
  lines, shown = [], []
  with pytest.raises(UserError, match=r"1 of 3 runs failed \(learning_rate=0.1; their error "
                     "lines are above"):
    sweep.run_sweep(config, tmp_path, sweeps, log=lines.append, show=shown.append)
  assert "run 2/3 failed: error: training diverged: loss nan at step 3" in lines
  assert shown[0].splitlines()[-1].startswith("| 0.1 | n/a |")  # the table, failed run last
  assert (tmp_path / "curves.png").exists()
  lines.clear()
  with pytest.raises(UserError, match="1 of 3 runs failed"):
    sweep.run_sweep(config, tmp_path, sweeps, log=lines.append, show=shown.append)
  assert [line.split(":")[0] for line in lines[:4]] == [
      "run 1/3", "run 2/3", "run 2/3 failed", "run 3/3"]  # only the failed run is retried
  assert "skipped" in lines[0] and "skipped" in lines[3]


def test_a_tiny_sweep_runs_skips_and_resumes(tmp_path, tiny_config, capsys):
  tiny_config.train.update(eval_interval=10)
  sweeps = _parse("seed=1,2", "train.steps=10,20", config=tiny_config)
  lines = []
  run = lambda: sweep.run_sweep(tiny_config, tmp_path, sweeps, config_file="configs/frost_cpu.py",
                                log=lines.append)
  table = run()
  names = ["seed=1,steps=10", "seed=1,steps=20", "seed=2,steps=10", "seed=2,steps=20"]
  assert lines[0] == f"run 1/4: seed=1 train.steps=10 in {tmp_path / names[0]}"
  summaries = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in names}
  assert [summaries[n]["step"] for n in names] == [10, 20, 10, 20]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results == table and sorted(r["folder"] for r in results) == names
  losses = [r["best_val_loss"] for r in results]
  assert losses == sorted(losses) and all(math.isfinite(x) for x in losses)
  assert results[0]["steps"] == 20  # more steps, lower loss
  markdown = (tmp_path / "results.md").read_text()
  assert len(markdown.splitlines()) == 2 + 4 and markdown in capsys.readouterr().out
  assert (tmp_path / "curves.png").stat().st_size > 10_000
  assert (tmp_path / names[0] / "loss.png").exists()

  # An unfinished run: no summary, and its last checkpoint gone. It resumes; the rest are skipped.
  resumed = tmp_path / names[3]
  (resumed / "summary.json").unlink()
  shutil.rmtree(resumed / "checkpoints" / "20")
  lines.clear()
  capsys.readouterr()
  untimed = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
  assert untimed(run()) == untimed(table)  # the same losses: a resume is bit-identical
  assert lines[:3] == [f"run {i + 1}/4: {sweeps_of} finished at step {s}; skipped "
                       f"({tmp_path / names[i]})"
                       for i, (sweeps_of, s) in enumerate([("seed=1 train.steps=10", 10),
                                                           ("seed=1 train.steps=20", 20),
                                                           ("seed=2 train.steps=10", 10)])]
  assert lines[3] == f"run 4/4: seed=2 train.steps=20 in {resumed}"
  assert f"resuming from step 10 in {resumed}" in capsys.readouterr().err
  lines.clear()
  run()
  assert sum("skipped" in line for line in lines) == 4


def test_sweep_cli_bad_flag_is_one_line_and_writes_nothing(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "sweep.py"), "--config=configs/frost_cpu.py",
       f"--workdir={tmp_path / 's'}", "--sweep=train.learning_rate=1e-3", "--sweep=train.nope=1,2"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert_one_line_error(result, "--sweep=train.nope=1,2", "no config field train.nope")
  assert not (tmp_path / "s").exists()
