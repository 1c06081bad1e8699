"""The train step and loop: learning, determinism, resume, no recompilation."""

import functools
import json
import math

import jax
import jax.monitoring
import numpy as np
import pytest

from conftest import frost_ids_and_vocab
from minigpt_jax import loop, precision, train
from minigpt_jax.support import checkpoint, guards, restore


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _evals(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def test_loss_falls_well_below_its_start_on_frost(tiny_config, tmp_path):
  tiny_config.train.update(steps=300, eval_interval=150, eval_iters=20)
  summary = loop.train_and_evaluate(tiny_config, tmp_path, show_progress=False)
  first = _evals(tmp_path)[0]
  assert abs(first["val_loss"] - math.log(summary["vocab_size"])) < 0.1
  assert summary["val_loss"] < first["val_loss"] - 1.2, summary
  assert summary["train_loss"] < 2.8


def test_bfloat16_compute_learns_and_keeps_float32_params(tiny_config, tmp_path):
  """--config.model.dtype=bfloat16: the loss falls as in float32; params, optimizer
  state and checkpoints stay float32, and sampling decodes in bfloat16 again."""
  tiny_config.model.dtype = "bfloat16"
  tiny_config.train.update(steps=300, eval_interval=150, eval_iters=20)
  summary = loop.train_and_evaluate(tiny_config, tmp_path, show_progress=False)
  assert summary["val_loss"] < _evals(tmp_path)[0]["val_loss"] - 1.2, summary
  model_cfg, params, _, step = restore.load(tmp_path)[1:]
  assert step == 300 and model_cfg.dtype == "bfloat16"
  assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(params))
  state = train.create_train_state(tiny_config, summary["vocab_size"])
  floats = [leaf for leaf in jax.tree_util.tree_leaves(state.opt_state)
            if np.issubdtype(leaf.dtype, np.floating)]
  assert floats and all(leaf.dtype == np.float32 for leaf in floats)


def test_summary_has_the_documented_fields(tiny_config, tmp_path, monkeypatch):
  tiny_config.model.dtype = "auto"
  summary = loop.train_and_evaluate(tiny_config, tmp_path, show_progress=False)
  written = json.loads((tmp_path / "summary.json").read_text())
  for field in ("step", "train_loss", "val_loss", "best_val_loss", "best_step", "wall_s",
                "steps_per_s", "vocab_size", "num_params"):
    assert written[field] is not None, field
  assert written["step"] == tiny_config.train.steps == summary["step"]
  assert written["best_val_loss"] <= written["val_loss"]
  assert written["dtype"] == precision.choose(tiny_config.model.dtype).dtype
  assert written["dtype_reason"] == precision.choose(tiny_config.model.dtype).reason
  decode = precision.choose_decode("auto")
  assert (written["decode_dtype"], written["decode_dtype_reason"]) == decode
  # sample.py and evaluate.py load an "auto" run in the decoding choice, whatever training's
  monkeypatch.setattr(precision, "choose_decode", lambda s: precision.Choice("bfloat16", "t"))
  assert restore.load(tmp_path).model_cfg.dtype == "bfloat16"
  assert written["mesh"] == {"data": 1, "fsdp": 1}
  assert written["state_bytes_per_device"] > 3 * 4 * summary["num_params"]  # params, mu, nu
  assert json.loads((tmp_path / "config.json").read_text())["model"]["n_embed"] == 32
  assert "chars" in json.loads((tmp_path / "vocab.json").read_text())


def test_rerunning_a_finished_run_trains_nothing(tiny_config, tmp_path):
  first = loop.train_and_evaluate(tiny_config, tmp_path, show_progress=False)
  again = loop.train_and_evaluate(tiny_config, tmp_path, show_progress=False)
  for field in ("step", "train_loss", "val_loss", "best_val_loss", "best_step"):
    assert again[field] == first[field], field
  assert len(_evals(tmp_path)) == 3  # steps 0, 20, 40: none repeated


def test_same_seed_gives_the_same_losses_and_another_seed_does_not(tiny_config, tmp_path):
  tiny_config.model.dropout = 0.1  # dropout keys must be reproducible too
  runs = []
  for name, seed in (("a", 7), ("b", 7), ("c", 8)):
    tiny_config.seed = seed
    loop.train_and_evaluate(tiny_config, tmp_path / name, show_progress=False)
    runs.append([(r["step"], r["train_loss"], r["val_loss"]) for r in _evals(tmp_path / name)])
  assert runs[0] == runs[1]
  assert runs[0] != runs[2]


def test_resumed_run_is_bit_identical_to_an_unbroken_one(tiny_config, tmp_path):
  tiny_config.model.dropout = 0.1
  loop.train_and_evaluate(tiny_config, tmp_path / "unbroken", show_progress=False)
  tiny_config.train.steps = 20  # stop half way, then rerun with the full length
  loop.train_and_evaluate(tiny_config, tmp_path / "resumed", show_progress=False)
  tiny_config.train.steps = 40
  loop.train_and_evaluate(tiny_config, tmp_path / "resumed", show_progress=False)
  assert _evals(tmp_path / "resumed") == [
      {**r, "wall_s": s["wall_s"]} for r, s in zip(_evals(tmp_path / "unbroken"),
                                                    _evals(tmp_path / "resumed"))]
  vocab_size = len(json.loads((tmp_path / "unbroken" / "vocab.json").read_text())["chars"])
  template = train.create_train_state(tiny_config, vocab_size)
  states = [checkpoint.restore_state(checkpoint.manager(tmp_path / name), 40, template)
            for name in ("unbroken", "resumed")]
  assert _leaves_equal(states[0], states[1])


def test_train_step_compiles_once(tiny_config):
  ids, vocab_size = frost_ids_and_vocab()
  state = train.create_train_state(tiny_config, vocab_size)
  step_fn = jax.jit(train.train_step, donate_argnums=0)
  draw = jax.jit(functools.partial(train.draw_batch, batch_size=8, block_size=16))
  losses, cache_sizes = [], []
  for _ in range(5):
    state, metrics = step_fn(state, draw(state, ids))
    losses.append(float(metrics["loss"]))
    cache_sizes.append((step_fn._cache_size(), draw._cache_size()))
  # jit caches are shared by every jit of the same function: count growth only.
  assert cache_sizes[1:] == cache_sizes[:1] * 4
  assert int(state.step) == 5 and len(set(losses)) == 5


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_several_steps_per_dispatch_equal_one_step_per_dispatch(tiny_config, dropout):
  """A scan of K steps gives the losses and params of K single-step calls."""
  tiny_config.model.dropout = dropout
  ids, vocab_size = frost_ids_and_vocab()
  run = functools.partial(train.jit_train_steps, batch_size=8, block_size=16)
  single = train.create_train_state(tiny_config, vocab_size)
  single_losses = []
  for _ in range(6):
    single, metrics = run(single, ids, num_steps=1)
    single_losses.append(float(metrics["loss"][0]))
  scanned = train.create_train_state(tiny_config, vocab_size)
  scanned_losses = []
  for _ in range(2):
    scanned, metrics = run(scanned, ids, num_steps=3)
    scanned_losses.extend(np.asarray(metrics["loss"]).tolist())
  np.testing.assert_allclose(scanned_losses, single_losses, rtol=1e-6)
  assert int(scanned.step) == int(single.step) == 6
  for a, b in zip(jax.tree_util.tree_leaves(scanned.params),
                  jax.tree_util.tree_leaves(single.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_steps_per_dispatch_does_not_change_a_run(tiny_config, tmp_path):
  """Through the loop: evaluations and train records match, misaligned K included."""
  tiny_config.model.dropout = 0.1
  runs = {}
  for k in (1, 7):  # 7 divides neither log_every (10) nor eval_interval (20)
    tiny_config.train.steps_per_dispatch = k
    loop.train_and_evaluate(tiny_config, tmp_path / str(k), show_progress=False)
    records = map(json.loads, (tmp_path / str(k) / "metrics.jsonl").read_text().splitlines())
    runs[k] = [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in records]
  assert [r[:2] for r in runs[7]] == [r[:2] for r in runs[1]]
  for a, b in zip(runs[7], runs[1]):
    np.testing.assert_allclose([x for x in a[2:] if x is not None],
                               [x for x in b[2:] if x is not None], rtol=1e-5)


def test_no_recompiles_across_steps_evaluations_and_a_resume(tiny_config, tmp_path):
  """The first run compiles init, the step and the evaluation once; a resume compiles nothing."""
  tiny_config.model.block_size = 12  # shapes no other test compiles
  tiny_config.train.update(steps=20, eval_interval=10, log_every=5, steps_per_dispatch=5)
  compiles = []
  listener = lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    sizes = lambda: (train.jit_train_steps._cache_size(), train.jit_estimate_loss._cache_size())
    before = sizes()
    loop.train_and_evaluate(tiny_config, tmp_path, show_progress=False)  # 4 calls, 3 evals
    assert [a - b for a, b in zip(sizes(), before)] == [1, 1]
    first_run = len(compiles)
    tiny_config.train.steps = 40
    loop.train_and_evaluate(tiny_config, tmp_path, show_progress=False)  # resumes at 20
    assert sizes()[0] - before[0] == 1 and sizes()[1] - before[1] == 1
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert first_run >= 2
  assert compiles[first_run:] == [], "the resumed run compiled again"
  assert len(_evals(tmp_path)) == 5  # steps 0, 10, 20, 30, 40


def test_steps_per_second_count_neither_compilation_nor_any_pause():
  """The step-0 evaluation (and its compile) comes before the clock starts: not subtracted."""
  now = [0.0]
  clock = guards.Stopwatch(clock=lambda: now[0])
  with clock.paused(None):
    now[0] += 5.0  # the step-0 evaluation
  now[0] += 2.0  # the first call compiles and runs 10 steps
  clock.call_done(10, None)
  now[0] += 1.0  # 10 steps
  with clock.paused(None):
    now[0] += 3.0  # an evaluation
  now[0] += 1.0  # 10 more
  assert clock.overall_rate(30) == pytest.approx(10.0)
  assert clock.wall_s() == 12.0
