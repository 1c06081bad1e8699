"""Hugging Face folders out and in: transformers' logits, tokens and greedy text are ours."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_one_line_error
from configs import bigram as bigram_config, frost_cpu, shakespeare_char_nanogpt
from configs import shakespeare_cpu_speedrun
from minigpt_jax import sampling
from minigpt_jax.errors import UserError
from minigpt_jax.support import restore
from minigpt_jax.model import ModelConfig, build_model, init_params
from minigpt_jax.tokenizer import BpeTokenizer, CharTokenizer, bpe_trainer_and_tokenizer
from minigpt_jax.tools import hf_deps, hf_export, hf_import, hf_tokenizer, imported

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("Whose woods these are I think I know.\nHis house is in the village though;\n"
        "He will not see me stopping here\nTo watch his woods fill up with snow.\n")
TINY = dict(block_size=16, n_embed=32, n_heads=2, n_layer=2, dropout=0.0, dtype="float32",
            cpu_tricks="off")
PROMPT = "the wo"
LAYOUTS = {  # config, native gpt2
    "lecture": (frost_cpu, False),
    "speedrun": (shakespeare_cpu_speedrun, False),
    "nanogpt": (shakespeare_char_nanogpt, True),
    "bigram": (bigram_config, False),
}


def _noisy(params, seed=0):
  """Random values in every leaf, biases and LayerNorm included, so each one matters."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _workdir(tmp_path, module, tokenizer, name="run"):
  """A step-0 workdir of `module`'s model at the tiny size, with random weights."""
  config = module.get_config()
  config.model.update(TINY)
  cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size)
  params = _noisy(init_params(build_model(cfg), jax.random.PRNGKey(1)))
  imported.save_step0(config, tokenizer, params, tmp_path / name, "test")
  return tmp_path / name, cfg, params


def _load(folder, native):
  kwargs = {} if native else {"trust_remote_code": True}
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            **kwargs).eval()
  return model, transformers.AutoTokenizer.from_pretrained(folder, **kwargs)


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def _hf_greedy(model, hf_tok, prompt, n):
  ids = hf_tok(prompt, return_tensors="pt").input_ids
  with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
  return hf_tok.decode(out[0])


def _our_greedy(cfg, params, tok, prompt, n):
  """What launch/sample.py --top_k=1 --naive prints."""
  ids, prompt = sampling.encode_prompt(tok, prompt)
  out = sampling.make_generate(cfg, "naive")(params, ids, jax.random.PRNGKey(0), n, 1.0, 1)
  return prompt + tok.decode(jax.device_get(out)[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_loads_in_transformers_with_our_logits_tokens_and_greedy_text(tmp_path, layout):
  module, native = LAYOUTS[layout]
  tok = CharTokenizer.from_text(TEXT)
  workdir, cfg, params = _workdir(tmp_path, module, tok)
  done = hf_export.export(workdir, tmp_path / "hf", command="test")
  assert done.native == native
  files = {p.name for p in (tmp_path / "hf").iterdir()}
  assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
          "tokenizer_config.json", "README.md"} <= files
  assert ("modeling_minigpt.py" in files) != native
  assert json.loads((tmp_path / "hf/config.json").read_text())["model_type"] == (
      "gpt2" if native else "minigpt")
  model, hf_tok = _load(tmp_path / "hf", native)

  ids = np.stack([tok.encode(TEXT[:16]), tok.encode(TEXT[20:36])])
  ours = np.asarray(build_model(cfg).apply({"params": params}, jnp.asarray(ids)))
  np.testing.assert_allclose(_hf_logits(model, ids), ours, atol=1e-4, rtol=0)

  assert hf_tok(TEXT)["input_ids"] == tok.encode(TEXT).tolist()
  assert hf_tok.decode(tok.encode(TEXT).tolist()) == TEXT
  n = 16 - len(PROMPT) if native else 24  # GPT-2's positions end at block_size
  assert _hf_greedy(model, hf_tok, PROMPT, n) == _our_greedy(cfg, params, tok, PROMPT, n)


def test_exported_card_names_corpus_steps_and_command(tmp_path):
  workdir, _, _ = _workdir(tmp_path, frost_cpu, CharTokenizer.from_text(TEXT))
  hf_export.export(workdir, tmp_path / "hf", command="python launch/export_hf.py --x")
  card = (tmp_path / "hf/README.md").read_text()
  for needle in ("frost", "sha256 ded0565d", "steps: 0", "best val loss",
                 "python launch/export_hf.py --x", '"n_embed": 32'):
    assert needle in card, card


def test_pipeline_runs_a_native_export(tmp_path):
  workdir, _, _ = _workdir(tmp_path, shakespeare_char_nanogpt, CharTokenizer.from_text(TEXT))
  hf_export.export(workdir, tmp_path / "hf")
  generate = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
  text = generate("the ", max_new_tokens=5, do_sample=False)[0]["generated_text"]
  assert text.startswith("the ") and len(text) == 9


def test_a_vocabulary_the_tokenizer_cannot_hold_is_one_error():
  with pytest.raises(UserError, match="cannot hold"):
    hf_tokenizer.to_hf(CharTokenizer("ab\ud800"), 16)


def _run(*args):
  return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)


def test_export_errors_are_one_line(tmp_path):
  (tmp_path / "empty").mkdir()
  assert_one_line_error(_run("launch/export_hf.py", f"--workdir={tmp_path / 'empty'}",
                             f"--out={tmp_path / 'out'}"), "no checkpoints")
  (tmp_path / "out").mkdir()
  (tmp_path / "out/file").write_text("x")
  assert_one_line_error(_run("launch/export_hf.py", f"--workdir={tmp_path / 'empty'}",
                             f"--out={tmp_path / 'out'}"), "not empty")


# -- Import: a tiny GPT-2 made here, with a byte-level BPE trained here.

@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
  """A GPT2LMHeadModel (2 layers, width 64, random weights and biases, gelu_new) and a
  byte-level BPE trained on TEXT, saved with save_pretrained."""
  folder = tmp_path_factory.mktemp("gpt2")
  hf, trainer = bpe_trainer_and_tokenizer(300)
  hf.train_from_iterator([TEXT] * 4, trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf)
  fast.save_pretrained(folder)
  config = transformers.GPT2Config(vocab_size=hf.get_vocab_size(), n_positions=32, n_embd=64,
                                   n_layer=2, n_head=2, bos_token_id=None, eos_token_id=None)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  return folder, model, fast


def test_gpt2_imports_with_its_logits_and_greedy_text(tiny_gpt2):
  folder, model, fast = tiny_gpt2
  got = hf_import.read(folder)
  assert got.native and got.fields["activation"] == "gelu_tanh"
  assert got.tokenizer.kind == "bpe" and got.tokenizer.vocab_size == model.config.vocab_size
  cfg = ModelConfig(vocab_size=got.tokenizer.vocab_size, **got.fields)
  ids = np.asarray([got.tokenizer.encode(TEXT)[:32]])
  ours = np.asarray(build_model(cfg).apply({"params": got.params}, jnp.asarray(ids)))
  np.testing.assert_allclose(_hf_logits(model, ids), ours, atol=1e-4, rtol=0)
  assert got.tokenizer.encode(TEXT).tolist() == fast(TEXT)["input_ids"]
  n = 32 - len(got.tokenizer.encode(PROMPT))
  assert _our_greedy(cfg, got.params, got.tokenizer, PROMPT, n) == _hf_greedy(
      model, fast, PROMPT, n)


def test_import_launcher_writes_a_workdir_that_samples_and_fine_tunes(tiny_gpt2, tmp_path):
  folder, model, fast = tiny_gpt2
  (tmp_path / "text.txt").write_text(TEXT * 8)
  workdir = tmp_path / "run"
  result = _run("launch/import_hf.py", f"--model={folder}", f"--workdir={workdir}",
                f"--text={tmp_path / 'text.txt'}")
  assert result.returncode == 0, result.stderr
  loaded = restore.load(workdir)  # what sample.py reads
  assert loaded.step == 0 and loaded.model_cfg.activation == "gelu_tanh"
  assert _our_greedy(loaded.model_cfg, loaded.params, loaded.tokenizer, PROMPT, 8) == (
      _hf_greedy(model, fast, PROMPT, 8))
  train = _run("launch/train.py", f"--config={workdir}/config.py", f"--workdir={workdir}",
               "--config.train.steps=2", "--config.train.eval_interval=2",
               "--config.train.eval_iters=1", "--config.train.batch_size=2",
               "--config.train.sample_tokens=0")
  assert train.returncode == 0, train.stderr
  assert "resuming from step 0" in train.stderr, train.stderr[-500:]
  assert json.loads((workdir / "summary.json").read_text())["step"] == 2


def test_export_import_export_is_bit_identical(tiny_gpt2, tmp_path):
  folder = tiny_gpt2[0]
  first = hf_import.read(folder)
  config = frost_cpu.get_config()
  config.model.update(first.fields)
  config.data.update(tokenizer="bpe", vocab_size=first.tokenizer.vocab_size)
  imported.save_step0(config, first.tokenizer, first.params, tmp_path / "a", "test")
  hf_export.export(tmp_path / "a", tmp_path / "hf_a")
  again = hf_import.read(tmp_path / "hf_a")
  imported.save_step0(config, again.tokenizer, again.params, tmp_path / "b", "test")
  hf_export.export(tmp_path / "b", tmp_path / "hf_b")
  a = safetensors_numpy.load_file(str(tmp_path / "hf_a/model.safetensors"))
  b = safetensors_numpy.load_file(str(tmp_path / "hf_b/model.safetensors"))
  original = safetensors_numpy.load_file(str(folder / "model.safetensors"))
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    # GPT2LMHeadModel saves the same tensors (with `transformer.`), lm_head tied
    assert a[name].tobytes() == original[name].tobytes(), name
  assert (tmp_path / "hf_a/tokenizer.json").read_text() == (
      tmp_path / "hf_b/tokenizer.json").read_text()


def test_a_pickle_only_folder_is_refused(tiny_gpt2, tmp_path):
  folder, model, _ = tiny_gpt2
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy(folder / name, tmp_path / name)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(UserError, match="can run any code.*safetensors"):
    hf_import.read(tmp_path)


def test_a_hub_id_downloads_configs_tokenizer_and_safetensors_only(tiny_gpt2, monkeypatch):
  hub = pytest.importorskip("huggingface_hub")
  asked = {}

  def download(repo_id, allow_patterns):  # the Hub is unreachable here: a local copy
    asked.update(repo_id=repo_id, patterns=allow_patterns)
    return str(tiny_gpt2[0])

  monkeypatch.setattr(hub, "snapshot_download", download)
  folder = hf_import.locate("gpt2")
  assert asked["repo_id"] == "gpt2" and "*.safetensors" in asked["patterns"]
  assert not any(p.endswith((".bin", ".py", "*")) and p != "*.safetensors"
                 for p in asked["patterns"])
  assert hf_import.read(folder, "gpt2").native


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(UserError, match=r'pip install -e "\.\[hf\]"'):
    hf_deps.require("safetensors.numpy", "launch/export_hf.py")


def test_training_and_sampling_do_not_import_the_hf_packages():
  code = ("import sys; import minigpt_jax.loop, minigpt_jax.sampling, minigpt_jax.tools.finish; "
          "from minigpt_jax.support import restore; "
          "bad = {'transformers', 'safetensors', 'huggingface_hub', 'torch'} & set(sys.modules); "
          "assert not bad, bad")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr
