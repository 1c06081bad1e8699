"""Faults injected one at a time: divergence, damaged checkpoints, two writers, a full disk,
an interrupt, a stop on two processes, and random SIGKILLs (tests/soak.py).

Each test asserts what survives: the good checkpoints stay loadable, a fallback
resume equals an unbroken run bit for bit, and the user sees one line.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import soak
from conftest import config_from_flags, frost_ids_and_vocab, tiny
from configs import frost_cpu
from minigpt_jax import loop, train
from minigpt_jax.support import checkpoint, guards, restore, workdir_lock
from minigpt_jax.tools import finish
from minigpt_jax.errors import UserError
from minigpt_jax.support.metrics import MetricsWriter
from minigpt_jax.model import ModelConfig, build_model, init_params

ROOT = Path(__file__).resolve().parents[1]


def _config(**train_fields):
  config = tiny(frost_cpu.get_config())
  config.model.dropout = 0.1
  config.train.update(**train_fields)
  return config


def _train(config, workdir, lines=None):
  log = None if lines is None else lines.append
  return loop.train_and_evaluate(config, workdir, log=log, show_progress=False)


def _leaves(workdir, step, config):
  vocab_size = len(json.loads((Path(workdir) / "vocab.json").read_text())["chars"])
  mngr = checkpoint.manager(workdir)
  state = checkpoint.restore_state(mngr, step, train.create_train_state(config, vocab_size))
  mngr.close()
  return jax.tree_util.tree_leaves((state.params, state.opt_state, state.step, state.rng))


def _bit_identical(a, b, equal_nan=False) -> bool:
  return len(a) == len(b) and all(
      x.dtype == y.dtype and np.array_equal(x, y, equal_nan=equal_nan) for x, y in zip(a, b))


def _records(workdir):
  """metrics.jsonl parsed strictly: a bare NaN or Infinity fails."""
  def reject(token):
    raise AssertionError(f"non-strict JSON token {token} in metrics.jsonl")
  return [json.loads(line, parse_constant=reject)
          for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _one_line(error) -> str:
  text = str(error.value)
  assert "\n" not in text, text
  return text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 40-step run with checkpoints at 20 and 40, copied by each test that changes it."""
  workdir = tmp_path_factory.mktemp("faults") / "run"
  _train(_config(), workdir)
  return workdir


@pytest.fixture
def run(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


# -- Divergence -------------------------------------------------------------------------------

def test_divergence_stops_with_one_error_and_keeps_the_good_checkpoints(run):
  """The issue's repro: resume with learning_rate=1e9."""
  with pytest.raises(UserError) as e:
    _train(_config(learning_rate=1e9, steps=80), run)
  message = _one_line(e)
  assert message.startswith("training diverged: loss nan")
  assert "(the first of steps 41-" in message and "last good checkpoint is step 40" in message
  assert "best: step 40" in message
  mngr = checkpoint.manager(run)
  assert mngr.all_steps() == [20, 40]  # nothing saved past the divergence, nothing collected
  assert checkpoint.best_step(mngr) == 40
  mngr.close()
  _, params, _, step = restore.load(run, best=True)[1:]
  assert step == 40 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
  records = _records(run)
  assert max(r["step"] for r in records) == 40
  assert all(np.isfinite(r["grad_norm"]) for r in records if r["kind"] == "train")


def test_nonfinite_val_losses_never_rank_as_best(tiny_config, tmp_path):
  """orbax's BestN kept NaN steps as best and collected the real best; now NaN is unranked."""
  state = train.create_train_state(tiny_config, 5)
  mngr = checkpoint.manager(tmp_path, keep=2)
  for step, val in ((1, 2.0), (2, float("nan")), (3, float("nan")), (4, float("inf"))):
    checkpoint.save(mngr, state.replace(step=state.step + step), tiny_config.to_dict(),
                    {"chars": "\n abc"}, {"val_loss": val})
  assert mngr.all_steps() == [1, 3, 4]
  assert checkpoint.best_step(mngr) == 1
  assert checkpoint.restore_json(mngr, 4)[2] == {"val_loss": None}  # strict JSON


def test_skipped_nonfinite_updates_leave_params_and_optimizer_unchanged(tiny_config):
  tiny_config.train.skip_nonfinite_updates = 2
  ids = np.arange(64, dtype=np.int32) % 5
  state = train.create_train_state(tiny_config, 5)
  poisoned = jax.tree_util.tree_map(lambda x: x, state.params)
  poisoned["lm_head"]["bias"] = poisoned["lm_head"]["bias"].at[0].set(np.nan)
  batch = train.draw_batch(state, ids, 8, 16)
  before = state.replace(params=poisoned)
  after, metrics = jax.jit(train.train_step)(before, batch)
  assert not np.isfinite(metrics["loss"]) and int(metrics["skipped_updates"]) == 1
  assert int(metrics["nonfinite_streak"]) == 1 and int(after.step) == 1
  assert _bit_identical(jax.tree_util.tree_leaves(after.params),
                        jax.tree_util.tree_leaves(before.params), equal_nan=True)
  assert _bit_identical(jax.tree_util.tree_leaves(after.opt_state.inner_state),
                        jax.tree_util.tree_leaves(before.opt_state.inner_state))
  healed, metrics = jax.jit(train.train_step)(after.replace(params=state.params), batch)
  assert np.isfinite(metrics["loss"]) and int(metrics["nonfinite_streak"]) == 0
  assert int(metrics["skipped_updates"]) == 1


def test_skipping_stops_after_the_limit_of_updates_in_a_row(tmp_path):
  with pytest.raises(UserError) as e:
    _train(_config(learning_rate=1e9, skip_nonfinite_updates=3), tmp_path)
  message = _one_line(e)
  assert "after 3 skipped updates in a row" in message and "no checkpoint was saved" in message


def test_turning_skipping_on_for_a_run_without_it_names_the_field(run):
  with pytest.raises(UserError, match="skip_nonfinite_updates=0 or use a new --workdir"):
    _train(_config(skip_nonfinite_updates=2, steps=60), run)


def test_float16_survives_an_injected_overflow_and_trains_on(tiny_config, tmp_path):
  """The overflowing step alone is skipped (its step still counts, as GradScaler's) and
  halves the scale; the guard lets it pass, and the scale and counters round-trip a save."""
  tiny_config.model.dtype = "float16"
  ids, vocab_size = frost_ids_and_vocab()
  step = jax.jit(lambda s: train.train_step(s, train.draw_batch(s, ids, 8, 16)))
  state = train.create_train_state(tiny_config, vocab_size)
  assert float(state.opt_state.scale) == 2.0**16
  # At 2**40 the logits' cotangent, about 2**40 / (B * T), is past float16's 65504.
  before = state.replace(opt_state=state.opt_state._replace(scale=np.float32(2.0**40)))
  after, metrics = step(before)
  assert np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
  assert int(after.step) == 1 and float(after.opt_state.scale) == 2.0**39
  assert (int(metrics["skipped_updates"]), float(metrics["loss_scale"])) == (1, 2.0**40)
  assert _bit_identical(jax.tree_util.tree_leaves((after.params, after.opt_state.inner_state)),
                        jax.tree_util.tree_leaves((before.params, before.opt_state.inner_state)))
  # Overflows halve the scale until it fits float16; then the loss falls.
  history = []
  for _ in range(40):
    after, metrics = step(after)
    history.append(metrics)
  metrics_K = jax.tree.map(lambda *m: np.stack(m), *history)
  skips = int(metrics_K["skipped_updates"][-1]) - 1
  assert 0 < skips < 30 and list(metrics_K["nonfinite_streak"][skips:]) == [0] * (40 - skips)
  assert float(after.opt_state.scale) == 2.0 ** (39 - skips)
  assert metrics_K["loss"][-5:].mean() < metrics_K["loss"][skips:skips + 5].mean() - 0.1
  guard = guards.DivergenceGuard(tiny_config.train.skip_nonfinite_updates)
  guard.add(1, metrics_K)
  assert guard.check() is None
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, after, tiny_config.to_dict(), {"chars": "ab"}, {"val_loss": 1.0})
  restored = checkpoint.restore_state(mngr, 41, train.create_train_state(tiny_config, vocab_size))
  assert _bit_identical(jax.tree_util.tree_leaves(restored.opt_state),
                        jax.tree_util.tree_leaves(after.opt_state))


def test_float16_stops_a_real_divergence_at_the_lowest_loss_scale(tmp_path):
  """Not finite at a loss scale of 1, the model itself diverged: 16 halvings from 2**16."""
  config = _config(learning_rate=1e9, eval_at_start=False)
  config.model.dtype = "float16"
  with pytest.raises(UserError) as e:
    _train(config, tmp_path)
  message = _one_line(e)
  assert message.startswith("training diverged: loss nan")
  assert "at float16's lowest loss scale (1) after 16 overflows in a row" in message
  assert "--config.model.dtype=float32" in message and "skip_nonfinite_updates" not in message


def test_metrics_are_strict_json(tmp_path):
  with MetricsWriter(tmp_path, log=lambda line: None) as writer:
    writer.write("train", 1, loss=float("nan"), grad_norm=float("inf"))
  assert (tmp_path / "metrics.jsonl").read_text() == (
      '{"kind": "train", "step": 1, "loss": null, "grad_norm": null}\n')


def test_a_window_longer_than_block_size_is_a_clear_error():
  cfg = ModelConfig(name="gpt", vocab_size=5, block_size=8, n_embed=16, n_heads=2, n_layer=1)
  model = build_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="window of 9 tokens but its block_size is 8"):
    model.apply({"params": params}, np.zeros((1, 9), np.int32))


# -- Damaged checkpoints -----------------------------------------------------------------------

def _a_file(step_dir: Path, item="params") -> Path:
  return max((p for p in (step_dir / item).rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _damage(step_dir: Path, how: str) -> str:
  """Damages a step as disks and people do; returns words the warning must hold."""
  if how == "truncated":
    target = _a_file(step_dir)
    target.write_bytes(target.read_bytes()[:10])
    return "bytes where"
  if how == "flipped":
    target = _a_file(step_dir)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return "does not match its sha256"
  if how == "missing":
    _a_file(step_dir).unlink()
    return "is missing"
  if how == "bad metadata without digests":  # as an older version saved it: orbax must notice
    (step_dir / checkpoint.DIGESTS).unlink()
    (step_dir / "params" / "_METADATA").write_text("{not json")
    return "orbax could not read it"
  raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing", "bad metadata without digests"])
def test_sampling_falls_back_past_a_damaged_step_and_step_n_fails_clearly(run, how):
  needle = _damage(run / "checkpoints" / "40", how)
  warnings = []
  _, params, _, step = restore.load(run, warn=warnings.append)[1:]
  assert step == 20 and len(warnings) == 1
  assert warnings[0].startswith("warning: checkpoint step 40 is damaged") and needle in warnings[0]
  assert "trying step 20" in warnings[0]
  with pytest.raises(UserError, match="step 40 is damaged") as e:
    restore.load(run, step=40)
  assert "--step (20)" in _one_line(e)
  assert restore.load(run, step=20).step == 20


def test_best_falls_back_to_the_next_best(run):
  _damage(run / "checkpoints" / "40", "flipped")  # step 40 is the best
  warnings = []
  assert restore.load(run, best=True, warn=warnings.append).step == 20
  assert len(warnings) == 1 and "step 40 is damaged" in warnings[0]


def test_no_step_restoring_is_one_error(run):
  for step in (20, 40):
    _damage(run / "checkpoints" / str(step), "truncated")
  with pytest.raises(UserError, match="restores \\(damaged steps: 40, 20\\)") as e:
    restore.load(run, warn=lambda line: None)
  _one_line(e)
  with pytest.raises(UserError, match="restores"):
    _train(_config(steps=60), run, lines=[])


def test_resume_from_the_fallback_step_is_bit_identical_to_an_unbroken_run(run, tmp_path):
  _damage(run / "checkpoints" / "40", "truncated")
  lines = []
  _train(_config(steps=60), run, lines)
  assert any(line.startswith("warning: checkpoint step 40 is damaged") for line in lines)
  assert any(line.startswith("resuming from step 20") for line in lines)
  moved = list((run / "damaged").iterdir())
  assert [p.name.split(".")[0] for p in moved] == ["step_40"]  # kept for a post-mortem
  unbroken = tmp_path / "unbroken"
  _train(_config(steps=60), unbroken)
  assert _bit_identical(_leaves(run, 60, _config()), _leaves(unbroken, 60, _config()))
  strip = lambda rs: [{k: v for k, v in r.items() if k not in ("wall_s", "steps_per_s",
                                                              "tokens_per_s")} for r in rs]
  assert strip(_records(run)) == strip(_records(unbroken))


# -- One writer per workdir ------------------------------------------------------------------

def _snapshot(workdir: Path) -> dict:
  return {p.relative_to(workdir).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(workdir.rglob("*"))}


def test_a_second_run_on_a_locked_workdir_changes_nothing(run):
  with workdir_lock.WorkdirLock(run):
    before = _snapshot(run)
    with pytest.raises(UserError) as e:
      _train(_config(steps=60), run)
    message = _one_line(e)
    assert f"is in use by another training run (pid {os.getpid()} on " in message
    assert _snapshot(run) == before
    assert restore.load(run).step == 40  # readers need no lock


_HOLDER = """
import sys, time
from minigpt_jax.support.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(300)
"""


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"pid {holder.pid} on "):
      workdir_lock.WorkdirLock(tmp_path).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  workdir_lock.WorkdirLock(tmp_path).acquire().release()


# -- Write errors ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs (root only); None where this machine does not allow the mount."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                           capture_output=True).returncode == 0 if shutil.which("mount") else False
  yield disk if mounted else None
  if mounted:
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
  """Fills `disk` but for about `leave_bytes`."""
  filler = disk / "filler"
  with filler.open("wb", buffering=0) as f:  # unbuffered: nothing left to flush on close
    try:
      while True:
        f.write(b"\0" * 65536)
    except OSError as e:
      assert e.errno == errno.ENOSPC
  os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
  return filler


@pytest.mark.parametrize("where", ["free-space check", "orbax write"])
def test_a_full_disk_while_saving_is_one_error_and_keeps_earlier_checkpoints(
    trained, small_disk, monkeypatch, where):
  """Caught before writing (the check), or where orbax's write itself fails."""
  if where == "orbax write":
    monkeypatch.setattr(checkpoint, "_check_free_space", lambda *args: None)
  if small_disk is None:  # no tmpfs here: inject the error orbax raises on a full disk
    workdir = trained.parent / "injected"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(trained, workdir)
    def full(self, step, *args, **kwargs):
      (Path(self.directory) / f"{step}.orbax-checkpoint-tmp").mkdir()
      raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device "
                       "[os_error_code='28']")
    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    monkeypatch.setattr(checkpoint, "_check_free_space", lambda *args: None)
  else:
    workdir = small_disk / "run"
    shutil.copytree(trained, workdir)
    filler = _fill(small_disk, leave_bytes=96 * 1024)  # logs fit; a checkpoint does not
  with pytest.raises(UserError) as e:
    _train(_config(steps=60), workdir)
  message = _one_line(e)
  assert message.startswith(f"could not save checkpoint step 60 in {workdir}")
  assert "No space left on device" in message
  ckpts = workdir / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir()) == ["20", "40"]  # no temp folder left
  assert not list(ckpts.glob(f"*/.{checkpoint.DIGESTS}.tmp*"))
  assert restore.load(workdir, warn=pytest.fail).step == 40
  monkeypatch.undo()
  if small_disk is not None:
    filler.unlink()
  assert _train(_config(steps=60), workdir)["step"] == 60  # space back: it resumes at 40


def test_a_full_disk_while_writing_metrics_is_one_error(small_disk, tmp_path, monkeypatch):
  workdir = (small_disk or tmp_path) / "metrics"
  workdir.mkdir()
  writer = MetricsWriter(workdir, log=lambda line: None)
  if small_disk is None:
    def full(*args, **kwargs):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Path, "open", full)
  else:
    _fill(small_disk, leave_bytes=0)
  with pytest.raises(UserError, match=f"could not write {workdir}/metrics.jsonl: No space left"):
    writer.write("train", 1, loss=1.0)
  monkeypatch.undo()
  if small_disk is not None:
    (small_disk / "filler").unlink()
  writer.close()


def test_a_read_only_workdir_is_one_error(trained, run, small_disk, monkeypatch):
  if small_disk is None:  # no tmpfs here: inject what a read-only filesystem raises
    workdir = run
    def read_only(*args, **kwargs):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(workdir_lock.os, "open", read_only)
  else:
    workdir = small_disk / "run"
    shutil.copytree(trained, workdir)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  with pytest.raises(UserError, match=f"could not write {workdir}/train.lock: Read-only "
                                      "file system") as e:
    _train(_config(steps=60), workdir)
  _one_line(e)
  assert restore.load(workdir, warn=pytest.fail).step == 40  # still readable


def test_the_resume_rewrite_of_metrics_is_atomic(tmp_path, monkeypatch):
  with MetricsWriter(tmp_path, log=lambda line: None) as writer:
    for step in (10, 20, 30):
      writer.write("train", step, loss=1.0)
  before = (tmp_path / "metrics.jsonl").read_text()
  real_write = Path.write_text
  def cut_short(self, text, *args, **kwargs):
    real_write(self, text[:5], *args, **kwargs)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(Path, "write_text", cut_short)
  with pytest.raises(UserError, match="metrics.jsonl: No space left on device"):
    MetricsWriter(tmp_path, resume_step=20, log=lambda line: None)
  assert (tmp_path / "metrics.jsonl").read_text() == before
  assert not list(tmp_path.glob(".*.tmp"))


def test_leftovers_of_a_killed_save_are_removed_on_the_next_start(run):
  partial = run / "checkpoints" / "60.orbax-checkpoint-tmp-1234"
  (partial / "params").mkdir(parents=True)
  (run / "checkpoints" / "40" / f".{checkpoint.DIGESTS}.tmp").write_text("{")
  (run / ".summary.json.tmp").write_text("{")
  lines = []
  _train(_config(steps=60), run, lines)
  assert any(line.startswith("removed 3 unfinished write(s)") for line in lines)
  assert not partial.exists() and not list(run.glob(".*.tmp"))
  assert (run / "checkpoints" / "40" / checkpoint.DIGESTS).is_file()


# -- Interrupts ---------------------------------------------------------------------------------

def test_an_interrupt_between_evaluations_saves_and_a_rerun_at_that_step_finishes(tmp_path):
  config = _config(steps=1000)
  def interrupt_after_step_20(line):
    if line.startswith("step 20:"):  # the eval line; the signal lands before the next call
      os.kill(os.getpid(), signal.SIGINT)
  with pytest.raises(KeyboardInterrupt, match="stopped at step 30"):
    loop.train_and_evaluate(config, tmp_path, log=interrupt_after_step_20, show_progress=False)
  meta = checkpoint.restore_json(checkpoint.manager(tmp_path), 30)[2]
  assert meta["val_loss"] is None and meta["best_step"] == 20
  config.train.steps = 30
  summary = _train(config, tmp_path)
  assert summary["val_loss"] is None and summary["best_step"] == 20
  line = finish.done_line(summary, tmp_path)
  assert line.startswith("done: step 30, train loss n/a, val loss n/a (best ")


def test_the_first_signal_sets_the_flag_and_a_second_would_end_the_process():
  """A second Ctrl-C must not wait for a hung save: the first restores the default action."""
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with guards.Interrupt() as interrupt:
    assert not interrupt.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert interrupt.requested
    assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.multiprocess
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
  """Both save the same step and exit 130; the rerun equals an unbroken run bit for bit."""
  from test_parallel import TINY, _free_port

  def launch(workdir, steps):
    address = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "train.py"), *TINY, f"--workdir={workdir}",
         f"--config.train.steps={steps}", f"--coordinator_address={address}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]

  stopped = tmp_path / "stopped"
  procs = launch(stopped, 100000)
  deadline = time.monotonic() + 240
  while not any(r["kind"] == "train" for r in (_records(stopped) if (
      stopped / "metrics.jsonl").exists() else [])):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only
  errs = [p.communicate(timeout=240)[1] for p in procs]
  assert [p.returncode for p in procs] == [130, 130], errs[0][-2000:] + errs[1][-2000:]
  step = int(errs[0].split("interrupted: stopped at step ")[1].split(";")[0])
  assert f"stopped at step {step};" in errs[1]
  assert checkpoint.manager(stopped).latest_step() == step

  final = step + 10
  for workdir in (stopped, tmp_path / "unbroken"):
    procs = launch(workdir, final)
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:]
    assert (f"resuming from step {step}" in errs[0]) == (workdir == stopped)
  config = config_from_flags(TINY)
  assert _bit_identical(_leaves(stopped, final, config), _leaves(tmp_path / "unbroken", final,
                                                                 config))


# -- Random SIGKILLs ----------------------------------------------------------------------------

def test_soak_of_random_kills_ends_bit_identical_with_no_checkpoint_lost(tmp_path, capsys):
  """docs/reliability.md's `python tests/soak.py`, short: 3 kills (at launch, in training, mid-save)."""
  status = soak.main(["--kills=3", "--steps=400", "--eval_interval=20", "--seed=1",
                      f"--workdir={tmp_path}"])
  report = json.loads(capsys.readouterr().out)
  assert report["kills"] == 3, report
  assert report["checkpoints_lost"] == 0, report
  assert report["params_bit_identical"] and report["evals_identical"], report
  assert status == 0 and report["ok"]
