"""The optimizer's recipe options: schedules, decay groups, Muon, accumulation, early stopping."""

import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import frost_ids_and_vocab, tiny
from minigpt_jax import config as config_lib, loop, optimizer, train
from minigpt_jax.support import checkpoint
from minigpt_jax.tools import finish
from minigpt_jax.errors import UserError


def _train_config(**changes):
  t = config_lib.get_config().train
  t.update(learning_rate=1e-3, min_learning_rate=1e-4, steps=1000, **changes)
  return t


def _rates(t, steps):
  return [optimizer.learning_rate_at(t, n) for n in steps]


def test_schedules_warm_up_as_nanogpt_then_follow_their_shape():
  cosine = _train_config(schedule="cosine", warmup_steps=100)
  np.testing.assert_allclose(_rates(cosine, [0, 49, 99, 100, 550, 1000]),
                             [1e-3 / 101, 50e-3 / 101, 100e-3 / 101, 1e-3, 5.5e-4, 1e-4],
                             rtol=1e-5)
  linear = _train_config(schedule="linear")
  np.testing.assert_allclose(_rates(linear, [0, 500, 1000]), [1e-3, 5.5e-4, 1e-4], rtol=1e-5)
  wsd = _train_config(schedule="wsd", decay_fraction=0.2)  # decays over steps 800-1000
  np.testing.assert_allclose(_rates(wsd, [0, 500, 800, 900, 1000]),
                             [1e-3, 1e-3, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)
  assert _rates(_train_config(), [0, 999]) == [1e-3, 1e-3]


def _params():
  cfg = tiny(config_lib.get_config())
  return train.create_train_state(cfg, vocab_size=11).params


def test_the_default_optimizer_is_torch_adamw_on_every_parameter():
  """Bit for bit optax.adamw at a constant rate: the lecture's results are kept."""
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  ours = optimizer.make_optimizer(config_lib.get_config().train)
  plain = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
  a = ours.update(grads, ours.init(params), params)[0]
  b = plain.update(grads, plain.init(params), params)[0]
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.mark.parametrize("decay_on", ["all", "matrices"])
def test_weight_decay_on_matrices_spares_gains_biases(decay_on):
  params = _params()
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = optimizer.make_optimizer(_train_config(weight_decay=0.1, weight_decay_on=decay_on))
  updates = tx.update(zero, tx.init(params), params)[0]
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    p = params
    for key in path:
      p = p[key.key]
    decayed = bool(np.any(np.asarray(u) != 0)) or not np.any(np.asarray(p) != 0)
    if decay_on == "all" or p.ndim >= 2:
      assert decayed, jax.tree_util.keystr(path)
    else:
      assert not np.any(np.asarray(u)), jax.tree_util.keystr(path)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_config, tmp_path):
  params = _params()
  labels = {jax.tree_util.keystr(p): g for p, g in
            jax.tree_util.tree_leaves_with_path(optimizer._groups(params))}
  assert labels["['block_0']['attn']['qkv']['kernel']"] == "muon"
  assert labels["['block_1']['mlp']['fc']['kernel']"] == "muon"
  assert labels["['tok_embed']['embedding']"] == "adamw"
  assert labels["['lm_head']['kernel']"] == "adamw"
  assert labels["['block_0']['ln1']['scale']"] == "adamw"
  tiny_config.train.update(optimizer="muon", muon_learning_rate=0.02, schedule="cosine",
                           warmup_steps=5, eval_at_start=False)
  summary = loop.train_and_evaluate(tiny_config, tmp_path, show_progress=False)
  assert summary["val_loss"] < 3.8  # from 4.25 at step 0: it learns
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "eval"] == [20, 40]  # none at step 0
  last = [r for r in records if r["kind"] == "train"][-1]
  assert last["muon_learning_rate"] == pytest.approx(
      optimizer.learning_rate_at(tiny_config.train, 39, 0.02))


def test_gradient_accumulation_equals_the_whole_batch_dropout_included(tiny_config):
  tiny_config.model.dropout = 0.2
  ids, vocab_size = frost_ids_and_vocab()
  results = []
  for k in (1, 4):
    state = train.create_train_state(tiny_config, vocab_size)
    state, metrics = train.jit_train_steps(state, ids, batch_size=8, block_size=16,
                                           num_steps=2, grad_accum_steps=k)
    results.append((metrics, state.params))
  (m1, p1), (m4, p4) = results
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _recipe(config):
  config.model.dropout = 0.1
  config.train.update(schedule="cosine", warmup_steps=5, min_learning_rate=1e-4,
                      grad_clip=0.5, grad_accum_steps=2, weight_decay=0.1,
                      weight_decay_on="matrices", beta2=0.99)
  return config


def _records(workdir, kind):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_resume_is_bit_identical_with_cosine_clipping_and_accumulation(tiny_config, tmp_path):
  config = _recipe(tiny_config)
  loop.train_and_evaluate(config, tmp_path / "unbroken", show_progress=False)

  def interrupt_after_step_20(line):
    if line.startswith("step 20:"):  # the eval line; the signal lands before the next call
      os.kill(os.getpid(), signal.SIGINT)
  with pytest.raises(KeyboardInterrupt, match="stopped at step 30"):
    loop.train_and_evaluate(config, tmp_path / "resumed", log=interrupt_after_step_20,
                            show_progress=False)
  loop.train_and_evaluate(config, tmp_path / "resumed", show_progress=False)
  strip = lambda records: [{k: v for k, v in r.items() if k not in ("wall_s", "steps_per_s",
                                                                    "tokens_per_s")}
                           for r in records]
  for kind in ("train", "eval"):
    assert strip(_records(tmp_path / "resumed", kind)) == strip(
        _records(tmp_path / "unbroken", kind))
  template = train.create_train_state(config, 69)
  states = [checkpoint.restore_state(checkpoint.manager(tmp_path / name), 40, template)
            for name in ("unbroken", "resumed")]
  assert all(np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True))
  # The logged learning rate is the schedule's, at the update each record ends.
  logged = [(r["step"], r["learning_rate"]) for r in _records(tmp_path / "unbroken", "train")]
  assert logged == [(s, optimizer.learning_rate_at(config.train, s - 1)) for s, _ in logged]
  assert logged[-1][1] < logged[0][1]  # the cosine's decay shows in the records


def test_a_resume_that_changes_the_optimizer_layout_names_the_field(tiny_config):
  saved = json.loads(json.dumps(tiny_config.to_dict()))
  vocab = {"chars": "ab"}
  for field, value in (("grad_clip", 1.0), ("optimizer", "muon"), ("schedule", "cosine"),
                       ("weight_decay_on", "matrices")):
    config = tiny(config_lib.get_config())
    config.train[field] = value
    with pytest.raises(UserError, match=rf"config.train.{field}=.* changes the optimizer "
                                        rf"state's layout; pass --config.train.{field}="):
      config_lib.check_fits(saved, vocab, config, vocab, "W")
  config = tiny(config_lib.get_config())
  config.train.update(learning_rate=3e-4, grad_accum_steps=2, steps=99)  # same layout
  config_lib.check_fits(saved, vocab, config, vocab, "W")
  del saved["train"]["grad_clip"]  # a checkpoint of an older version
  config_lib.check_fits(saved, vocab, tiny(config_lib.get_config()), vocab, "W")


def test_early_stopping_stops_saving_when_val_stalls_and_bpc_is_reported(tmp_path):
  # Train text of "ab" and val text of "cd": learning the train split only worsens val.
  text = tmp_path / "stall.txt"
  text.write_text("ab" * 900 + "cd" * 100)
  config = tiny(config_lib.get_config())
  config.data.path = str(text)
  config.train.update(steps=200, eval_interval=10, early_stop_evals=2, learning_rate=1e-2)
  lines = []
  summary = loop.train_and_evaluate(config, tmp_path / "run", log=lines.append,
                                    show_progress=False)
  assert summary["early_stopped"] and summary["step"] == 20 and summary["best_step"] == 0
  assert any(line.startswith("stopping early at step 20") for line in lines)
  assert checkpoint.manager(tmp_path / "run").latest_step() == 20
  assert summary["val_bpc"] == pytest.approx(summary["val_loss"] / math.log(2), abs=1e-4)
  assert summary["best_val_bpc"] == pytest.approx(summary["best_val_loss"] / math.log(2),
                                                  abs=1e-4)
  evals = _records(tmp_path / "run", "eval")
  assert all(r["train_bpc"] == pytest.approx(r["train_loss"] / math.log(2), abs=1e-4)
             for r in evals)
  assert finish.done_line(summary, tmp_path).startswith("done (stopped early): step 20")
  again = loop.train_and_evaluate(config, tmp_path / "run", log=lines.append,
                                  show_progress=False)
  assert again["step"] == 20 and again["early_stopped"]
  assert lines[-1].startswith("already stopped early at step 20")


def test_equal_settings_give_the_same_optimizer_object():
  """jit reuses its compilations: steps matter only to a schedule, muon's rate only to muon."""
  def train(**changes):
    t = config_lib.get_config().train
    t.update(changes)
    return t
  assert optimizer.make_optimizer(train()) is optimizer.make_optimizer(
      train(steps=7, min_learning_rate=1e-4, muon_learning_rate=0.5))
  cosine = optimizer.make_optimizer(train(schedule="cosine"))
  assert cosine is optimizer.make_optimizer(train(schedule="cosine").to_dict())
  assert cosine is not optimizer.make_optimizer(train(schedule="cosine", steps=7))


def test_the_loss_scale_unscales_skips_an_overflow_halves_and_grows(tiny_config):
  """float16's GradScaler: an overflow skips exactly its update; the others are plain AdamW's."""
  params = _params()
  tiny_config.train.loss_scale_growth_interval = 3
  tx = optimizer.make_optimizer(tiny_config.train, "float16")
  plain = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
  state, plain_state, plain_params = tx.init(params), plain.init(params), params
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  scales = []
  for overflow in (False, True, False, False, False, False):
    scale = optimizer.loss_scale(state)
    scales.append(float(scale))
    scaled = jax.tree.map(lambda g: g * scale, grads)
    if overflow:  # one leaf overflowed float16 in the backward pass
      scaled["lm_head"]["bias"] = scaled["lm_head"]["bias"].at[0].set(jnp.inf)
    updates, new_state = tx.update(scaled, state, params)
    params = optax.apply_updates(params, updates)
    if overflow:
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.inner_state),
                                                      jax.tree.leaves(state.inner_state)))
      assert not any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
    else:  # bit for bit AdamW on the unscaled gradients: the scale is a power of two
      plain_updates, plain_state = plain.update(grads, plain_state, plain_params)
      plain_params = optax.apply_updates(plain_params, plain_updates)
      assert jax.tree.all(jax.tree.map(np.array_equal, params, plain_params))
    state = new_state
  assert scales == [2.0**16, 2.0**16, 2.0**15, 2.0**15, 2.0**15, 2.0**16]  # x2 after 3 finite
  assert (int(state.notfinite_count), int(state.total_notfinite), int(state.good_steps)) == (
      0, 1, 1)
  for _ in range(20):  # a model that is not finite: the scale halves down to its floor, 1
    state = tx.update(jax.tree.map(lambda g: g * np.nan, grads), state, params)[1]
  assert float(state.scale) == optimizer.MIN_LOSS_SCALE and int(state.notfinite_count) == 20
  # The scale is float16's only: other dtypes keep their optimizer (and its compilations).
  t = tiny_config.train
  assert optimizer.make_optimizer(t) is optimizer.make_optimizer(t, "bfloat16")
  assert optimizer.loss_scale(optimizer.make_optimizer(t).init(params)) is None
  assert tx is optimizer.make_optimizer(t.to_dict() | {"skip_nonfinite_updates": 2}, "float16")


def test_a_resume_across_float16_names_model_dtype(tiny_config):
  """float16 adds the loss scale to the optimizer state: a checkpoint resumes only in kind."""
  vocab = {"chars": "ab"}
  saved = json.loads(json.dumps(tiny_config.to_dict()))
  config = tiny(config_lib.get_config())
  config.model.dtype = "float16"
  with pytest.raises(UserError, match=r"config.model.dtype='float32' but this config has "
                                      r"'float16', which changes the optimizer state's layout; "
                                      r"pass --config.model.dtype='float32' or use a new"):
    config_lib.check_fits(saved, vocab, config, vocab, "W")
  saved["model"]["dtype"] = "float16"
  config.train.update(skip_nonfinite_updates=3, loss_scale_growth_interval=10)  # same layout
  config_lib.check_fits(saved, vocab, config, vocab, "W")
  config.model.dtype = "bfloat16"
  with pytest.raises(UserError, match="pass --config.model.dtype='float16'"):
    config_lib.check_fits(saved, vocab, config, vocab, "W")
