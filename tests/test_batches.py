"""Host-side batches: the device path's windows from the same keys, 64-bit starts, memmaps.

The runs compare whole metrics records: the host path must give the device
path's losses exactly (same windows, same programs on the same ids), on one
device here and on four fake CPU devices in one subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minigpt_jax import batches, config as config_lib, data, loop, parallel, tokens, train
from minigpt_jax.support import checkpoint
from minigpt_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_host_starts_are_get_batch_starts():
  """Keys of several steps: the host's windows are get_batch's, row for row."""
  ids_N = (np.arange(5000) * 7 % 65).astype(np.uint16)
  keys_K = train.batch_keys(jax.random.PRNGKey(3), 11, 4)
  starts_KB = data.window_starts(keys_K, len(ids_N), 8, 16)
  assert starts_KB.dtype == np.int64 and starts_KB.shape == (4, 8)
  windows_KBT1 = data.gather_windows(ids_N, starts_KB, 16)
  assert windows_KBT1.dtype == np.int32 and windows_KBT1.shape == (4, 8, 17)
  device_N = jnp.asarray(ids_N, jnp.int32)
  for k in range(4):
    x_BT, y_BT = data.get_batch(keys_K[k], device_N, 8, 16)
    np.testing.assert_array_equal(windows_KBT1[k, :, :-1], x_BT)
    np.testing.assert_array_equal(windows_KBT1[k, :, 1:], y_BT)


def test_starts_past_int32_are_64_bit_and_in_range():
  """A fake 2**40-token corpus (no data): starts spread past 2**31, never past the end."""
  N, B, T = 2**40, 512, 16
  keys_K = train.batch_keys(jax.random.PRNGKey(0), 0, 3)
  starts_KB = data.window_starts(keys_K, N, B, T)
  assert starts_KB.dtype == np.int64
  assert starts_KB.min() >= 0 and starts_KB.max() < N - T
  assert (starts_KB > 2**32).mean() > 0.9  # uniform over 2**40: nearly all past 2**32
  np.testing.assert_array_equal(starts_KB, data.window_starts(keys_K, N, B, T))
  assert not np.array_equal(starts_KB[0], starts_KB[1])
  # Up to the int32 edge it is still randint's draw, so today's runs are unchanged.
  edge = data.INT32_SPAN + T
  np.testing.assert_array_equal(
      data.window_starts(keys_K[:1], edge, B, T)[0],
      jax.random.randint(keys_K[0], (B,), 0, data.INT32_SPAN))


def test_gather_past_2_31_from_a_sparse_memmap(tmp_path):
  """A 4 GiB uint16 token file that is all hole but its last page: windows read past 2**31."""
  n = 2**31 + 4096
  path = tmp_path / "train.bin"
  with open(path, "wb") as f:
    f.truncate(n * 2)  # sparse: no blocks written
  tail = np.memmap(path, np.uint16, "r+", offset=(n - 4096) * 2, shape=(4096,))
  tail[:] = np.arange(4096) % 60000
  tail.flush()
  del tail
  ids_N = np.memmap(path, np.uint16, "r", shape=(n,))
  starts = np.array([[n - 4096, n - 17, 2**31 + 5]], np.int64)
  windows = data.gather_windows(ids_N, starts, 16)
  np.testing.assert_array_equal(windows[0, 0], np.arange(17))
  np.testing.assert_array_equal(windows[0, 1], np.arange(4096 - 17, 4096))
  np.testing.assert_array_equal(windows[0, 2], np.arange(5, 22))  # n - 4096 is 2**31
  assert os.stat(path).st_blocks * 512 < 2**24  # it stayed sparse


def test_the_host_path_is_chosen_by_flag_budget_and_size(tiny_config):
  """len() is all uses_host reads, so ranges stand in for corpora of any size."""
  small = {"train": range(1000), "val": range(100)}
  assert batches.uses_host(tiny_config, small) is None
  tiny_config.data.device_budget_mb = 1
  assert "over config.data.device_budget_mb (1)" in batches.uses_host(
      tiny_config, {"train": range(2**20), "val": range(100)})
  tiny_config.data.device_budget_mb = 10**9
  assert "past int32 indices" in batches.uses_host(
      tiny_config, {"train": range(2**31 + 100), "val": range(100)})
  tiny_config.data.on_device = False
  assert "on_device is False" in batches.uses_host(tiny_config, small)


@pytest.mark.parametrize("budget", [0, -5])
def test_a_budget_that_is_not_positive_is_a_one_line_error(budget):
  config = config_lib.get_config()
  config.data.device_budget_mb = budget
  with pytest.raises(UserError, match=rf"config.data.device_budget_mb is {budget}; use a "
                                      "positive size in MB"):
    config_lib.validate(config)


def test_one_process_holds_every_row():
  sharding = jax.sharding.NamedSharding(parallel.make_mesh(1),
                                        jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))
  assert batches.local_rows(sharding, (3, 8, 17), 1) == (0, 8)


def _memmap_corpus(monkeypatch, tmp_path):
  """load_corpus's splits as uint16 memmaps of files in tmp_path (what token files give)."""
  real = tokens.load_corpus

  def load(config, base=None):
    corpus = real(config, base)
    splits = {}
    for name, ids in (("train", corpus.train_ids), ("val", corpus.val_ids)):
      mm = np.memmap(tmp_path / f"{name}.bin", np.uint16, "w+", shape=ids.shape)
      mm[:] = ids
      mm.flush()
      splits[name] = np.memmap(tmp_path / f"{name}.bin", np.uint16, "r", shape=ids.shape)
    return corpus._replace(train_ids=splits["train"], val_ids=splits["val"])

  monkeypatch.setattr(tokens, "load_corpus", load)


def _records(workdir):
  keep = ("kind", "step", "loss", "grad_norm", "train_loss", "val_loss")
  return [{k: r.get(k) for k in keep}
          for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())]


def test_host_memmap_run_resumed_equals_the_device_run_exactly(tiny_config, tmp_path,
                                                               monkeypatch):
  """Dropout, 3 steps per call (misaligned), 2 micro-batches, evaluations; stopped and resumed."""
  tiny_config.model.dropout = 0.1
  tiny_config.train.update(steps_per_dispatch=3, grad_accum_steps=2)
  device = loop.train_and_evaluate(tiny_config, tmp_path / "device", show_progress=False)
  assert device["data_on_device"] is True
  _memmap_corpus(monkeypatch, tmp_path)
  tiny_config.data.on_device = False
  tiny_config.train.steps = 20
  loop.train_and_evaluate(tiny_config, tmp_path / "host", show_progress=False)
  tiny_config.train.steps = 40
  host = loop.train_and_evaluate(tiny_config, tmp_path / "host", show_progress=False)
  assert host["data_on_device"] is False
  assert _records(tmp_path / "host") == _records(tmp_path / "device")
  template = train.create_train_state(tiny_config, device["vocab_size"])
  states = [checkpoint.restore_state(checkpoint.manager(tmp_path / name), 40, template)
            for name in ("device", "host")]
  for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1]),
                  strict=True):
    np.testing.assert_array_equal(a, b)


_FOUR_DEVICES = """
import json, sys
from tests.conftest import tiny  # run from the repo root
from configs import frost_cpu
from minigpt_jax import loop
out = {}
for on_device in (True, False):
  config = tiny(frost_cpu.get_config())
  config.model.dropout = 0.1
  config.data.on_device = on_device
  config.train.update(steps=10, eval_interval=10, steps_per_dispatch=5, grad_accum_steps=2)
  workdir = f"{sys.argv[1]}/{on_device}"
  summary = loop.train_and_evaluate(config, workdir, show_progress=False, log=lambda line: None)
  out[on_device] = (summary["devices"], [
      {k: r.get(k) for k in ("kind", "step", "loss", "grad_norm", "train_loss", "val_loss")}
      for r in map(json.loads, open(workdir + "/metrics.jsonl"))])
print(json.dumps(out))
"""


def test_four_devices_host_equals_device_exactly(tmp_path):
  """Each of 4 fake CPU devices gets its rows from the host: the device path's losses.

  Two calls of 5 steps (the second prefetched), 2 micro-batches, dropout, evaluations;
  misaligned calls and a resume are the one-device test's.
  """
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                     " --xla_force_host_platform_device_count=4").strip()}
  result = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["true"][0] == out["false"][0] == 4
  assert len(out["true"][1]) == 3  # evals at 0 and 10, a train record at 10
  assert out["false"][1] == out["true"][1]
