"""minigpt_jax/tools/torch_twin.py: our initial weights give our loss in PyTorch; its modes run."""

import jax
import numpy as np
import pytest

from configs import frost_cpu, shakespeare_char_nanogpt, shakespeare_cpu_speedrun
from minigpt_jax.data import CharTokenizer
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, build_model, cross_entropy, init_params
from minigpt_jax.tools import torch_import

torch = pytest.importorskip("torch")
from minigpt_jax.tools import torch_twin  # noqa: E402  (imports torch)

TEXT = "Two roads diverged in a yellow wood,\nAnd sorry I could not travel both\n" * 4
TOKENIZER = CharTokenizer.from_text(TEXT)
# The three layouts --compare-torch meets: the lecture's, the speedrun's (rotary, GELU,
# tied) and nanoGPT's (GELU, no biases, tied), at a tiny size.
CONFIGS = {"lecture": frost_cpu, "speedrun": shakespeare_cpu_speedrun,
           "nanogpt": shakespeare_char_nanogpt}


def _model_cfg(name):
  config = CONFIGS[name].get_config()
  config.model.update(block_size=16, n_embed=32, n_heads=2, n_layer=2, dtype="float32")
  return ModelConfig.from_config(config.model, TOKENIZER.vocab_size)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_twin_given_our_initial_weights_gives_our_loss(name):
  cfg = _model_cfg(name)
  params = init_params(build_model(cfg), jax.random.PRNGKey(3))
  ids = TOKENIZER.encode(TEXT)
  starts = np.random.default_rng(0).integers(0, len(ids) - cfg.block_size - 1, size=4)
  window_BT1 = np.stack([ids[s:s + cfg.block_size + 1] for s in starts])
  ours = cross_entropy(build_model(cfg).apply({"params": params}, window_BT1[:, :-1]),
                       window_BT1[:, 1:])
  twin = torch_twin.load_params(jax.device_get(params), torch_twin.TwinConfig.of(cfg))
  assert sum(p.numel() for p in twin.parameters()) == sum(
      x.size for x in jax.tree_util.tree_leaves(params))
  with torch.no_grad():
    _, theirs = twin(torch.from_numpy(window_BT1[:, :-1]).long(),
                     torch.from_numpy(window_BT1[:, 1:]).long())
  assert abs(float(ours) - float(theirs)) < 1e-5


def test_a_twin_with_nanogpts_options_saves_a_nanogpt_state_dict():
  """Its names are nanoGPT's: torch_import reads our params back from it, bit for bit."""
  cfg = _model_cfg("nanogpt")
  params = jax.device_get(init_params(build_model(cfg), jax.random.PRNGKey(3)))
  state_dict = torch_twin.load_params(params, torch_twin.TwinConfig.of(cfg)).state_dict()
  back = torch_import.convert({k: v.numpy() for k, v in state_dict.items()}, cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def _run(tmp_path, *flags):
  text = tmp_path / "poems.txt"
  text.write_text(TEXT * 4)
  return torch_twin.run(torch_twin._args([f"--text={text}", "--n_layer=1", "--n_embed=32",
                                          "--block_size=16", "--batch_size=4", "--steps=2",
                                          "--warmup=1", "--sample_tokens=3", *flags]))


@pytest.mark.parametrize("flags,impl", [((), "torch-eager"), (("--bf16",), "torch-eager-bf16"),
                                        (("--compile", "--position=rope", "--tie_embeddings"),
                                         "torch-compile")])
def test_each_mode_trains_and_decodes(tmp_path, monkeypatch, flags, impl):
  """--compile traces the twin with TorchDynamo; its default backend, inductor, would spend a
  minute of C++ compilation here, so the test hands dynamo's graphs to the eager backend."""
  compile_ = torch.compile
  monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))
  out = _run(tmp_path, "--eval_iters=1", *flags)
  assert out["impl"] == impl and out["steps"] == 3
  for field in ("steps_per_s", "tokens_per_s", "naive_sample_tok_per_s", "final_loss",
                "train_loss", "val_loss"):
    assert out[field] > 0, field


def test_bad_input_is_one_line(tmp_path, capsys):
  with pytest.raises(UserError, match="--steps is 0; use a positive integer"):
    _run(tmp_path, "--steps=0")
  with pytest.raises(UserError, match="cannot read --text"):
    torch_twin.run(torch_twin._args([f"--text={tmp_path / 'missing.txt'}"]))
  with pytest.raises(SystemExit) as e:
    torch_twin.main(["--text=x.txt", "--preset=nope"])
  assert e.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: argument --preset"), lines
