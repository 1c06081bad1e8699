"""config.train.profile_steps: a trace appears in the workdir, and the run is unchanged."""

import gzip
import json

import jax
import numpy as np

from minigpt_jax import loop, train
from minigpt_jax.support import checkpoint


def _records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in r.items() if k not in ("wall_s", "steps_per_s", "tokens_per_s")}
          for r in map(json.loads, lines)]


def test_a_profiled_run_writes_a_trace_and_trains_exactly_as_without(tiny_config, tmp_path):
  tiny_config.model.dropout = 0.1
  lines = {}
  for name, steps in (("plain", 0), ("profiled", 3)):
    tiny_config.train.profile_steps = steps
    lines[name] = []
    loop.train_and_evaluate(tiny_config, tmp_path / name, log=lines[name].append,
                            show_progress=False)
  assert not (tmp_path / "plain" / "profile").exists()
  runs = list((tmp_path / "profiled" / "profile" / "plugins" / "profile").iterdir())
  assert len(runs) == 1
  assert list(runs[0].glob("*.xplane.pb"))  # TensorBoard's profile plugin reads these
  with gzip.open(runs[0] / "perfetto_trace.json.gz") as f:
    events = json.load(f)["traceEvents"]
  assert any("train_steps" in e.get("name", "") for e in events)  # the compiled call ran in it
  k = tiny_config.train.steps_per_dispatch  # whole calls: the first one or more of K steps
  assert [line for line in lines["profiled"] if line.startswith("profiled steps ")] == [
      line for line in lines["profiled"] if line.startswith(f"profiled steps {k + 1}-{2 * k} ")]
  assert sum(line.startswith("profiled steps ") for line in lines["profiled"]) == 1

  assert _records(tmp_path / "profiled") == _records(tmp_path / "plain")
  vocab_size = len(json.loads((tmp_path / "plain" / "vocab.json").read_text())["chars"])
  template = train.create_train_state(tiny_config, vocab_size)
  a, b = (checkpoint.restore_state(checkpoint.manager(tmp_path / name), 40, template)
          for name in ("plain", "profiled"))
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
