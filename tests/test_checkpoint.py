"""Checkpoints: bit-exact restore, retention, fit checks, partial saves."""

import jax
import numpy as np
import pytest

from minigpt_jax import config as config_lib, train
from minigpt_jax.support import checkpoint, restore
from minigpt_jax.errors import UserError

VOCAB = {"chars": "\n abc"}


def _state(config, steps=0):
  state = train.create_train_state(config, len(VOCAB["chars"]))
  return state.replace(step=state.step + steps)


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def test_save_then_restore_is_bit_identical(tiny_config, tmp_path):
  state = _state(tiny_config, steps=3)
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, state, tiny_config.to_dict(), VOCAB, {"val_loss": 1.5})
  tiny_config.seed += 1  # a different fresh state, overwritten by the restore
  restored = checkpoint.restore_state(mngr, 3, _state(tiny_config))
  assert _leaves_equal(state, restored)
  config_dict, vocab, meta = checkpoint.restore_json(mngr, 3)
  assert vocab == VOCAB and meta["val_loss"] == 1.5
  assert config_dict["model"] == tiny_config.to_dict()["model"]


def test_keeps_the_latest_n_plus_the_best(tiny_config, tmp_path):
  mngr = checkpoint.manager(tmp_path, keep=2)
  state = _state(tiny_config)
  for step, val in ((1, 1.0), (2, 3.0), (3, 2.0), (4, 4.0), (5, 5.0)):
    checkpoint.save(mngr, state.replace(step=state.step + step), tiny_config.to_dict(),
                    VOCAB, {"val_loss": val})
  assert mngr.all_steps() == [1, 4, 5]
  assert checkpoint.best_step(mngr) == 1


@pytest.mark.parametrize("field,value", [("n_embed", 64), ("n_layer", 3), ("block_size", 8),
                                         ("name", "bigram")])
def test_restoring_into_a_config_it_does_not_fit_names_the_field(tiny_config, field, value):
  saved = tiny_config.to_dict()
  tiny_config.model[field] = value
  with pytest.raises(UserError, match=f"config.model.{field}=") as e:
    config_lib.check_fits(saved, VOCAB, tiny_config, VOCAB, "runs/x")
  assert "\n" not in str(e.value)


def test_a_different_vocabulary_does_not_fit(tiny_config):
  with pytest.raises(UserError, match="vocabulary"):
    config_lib.check_fits(tiny_config.to_dict(), VOCAB, tiny_config, {"chars": "xyz"}, "w")


def test_a_save_cut_short_by_a_kill_is_ignored(tiny_config, tmp_path):
  state = _state(tiny_config, steps=2)
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, state, tiny_config.to_dict(), VOCAB, {"val_loss": 1.0})
  mngr.close()
  # What a kill -9 during orbax's write of step 4 leaves: a temporary folder.
  partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
  (partial / "params").mkdir(parents=True)
  (partial / "params" / "junk").write_bytes(b"\0" * 10)
  mngr = checkpoint.manager(tmp_path)
  assert mngr.latest_step() == 2
  assert _leaves_equal(state, checkpoint.restore_state(mngr, 2, _state(tiny_config)))


def test_restore_load_errors_name_the_fix(tiny_config, tmp_path):
  with pytest.raises(UserError, match="train first"):
    restore.load(tmp_path / "nothing")
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, _state(tiny_config, 2), tiny_config.to_dict(), VOCAB, {"val_loss": None})
  with pytest.raises(UserError, match="available steps: 2"):
    restore.load(tmp_path, step=5)
  with pytest.raises(UserError, match="drop --best"):
    restore.load(tmp_path, best=True)
  model_cfg, params, tokenizer, step = restore.load(tmp_path)[1:]
  assert step == 2 and tokenizer.chars == VOCAB["chars"]
  assert model_cfg.n_embed == 32 and _leaves_equal(params, _state(tiny_config).params)
