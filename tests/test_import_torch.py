"""PyTorch weights imported: same logits, same greedy text, one-line errors."""

import collections
import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import assert_one_line_error
from configs import bigram as bigram_config, frost_cpu
from minigpt_jax import precision, sampling
from minigpt_jax.support import restore
from minigpt_jax.tools import imported, torch_import
from minigpt_jax.data import CharTokenizer
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, build_model, init_params

torch = pytest.importorskip("torch")
from minigpt_jax.tools import torch_twin  # noqa: E402  (imports torch)
nn = torch.nn
F = torch.nn.functional

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Whose woods these are I think I know.\nHis house is in the village though;\n"
TOKENIZER = CharTokenizer.from_text(TEXT)
V, T, C, H, L = TOKENIZER.vocab_size, 16, 32, 2, 2
SIZES = [f"--config.model.block_size={T}", f"--config.model.n_embed={C}",
         f"--config.model.n_heads={H}", f"--config.model.n_layer={L}"]
PROMPT = "the "


# -- The lecture's gpt.py and bigram.py, at the tiny size (their names, our indent).

class Head(nn.Module):

  def __init__(self, head_size):
    super().__init__()
    self.key = nn.Linear(C, head_size, bias=False)
    self.query = nn.Linear(C, head_size, bias=False)
    self.value = nn.Linear(C, head_size, bias=False)
    self.register_buffer("tril", torch.tril(torch.ones(T, T)))

  def forward(self, x):
    _, t, _ = x.shape
    k, q = self.key(x), self.query(x)
    wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5
    wei = F.softmax(wei.masked_fill(self.tril[:t, :t] == 0, float("-inf")), dim=-1)
    return wei @ self.value(x)


class MultiHeadAttention(nn.Module):

  def __init__(self, num_heads, head_size):
    super().__init__()
    self.heads = nn.ModuleList([Head(head_size) for _ in range(num_heads)])
    self.proj = nn.Linear(head_size * num_heads, C)

  def forward(self, x):
    return self.proj(torch.cat([h(x) for h in self.heads], dim=-1))


class FeedFoward(nn.Module):

  def __init__(self):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(C, 4 * C), nn.ReLU(), nn.Linear(4 * C, C), nn.Dropout(0.0))

  def forward(self, x):
    return self.net(x)


class Block(nn.Module):

  def __init__(self):
    super().__init__()
    self.sa, self.ffwd = MultiHeadAttention(H, C // H), FeedFoward()
    self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)

  def forward(self, x):
    x = x + self.sa(self.ln1(x))
    return x + self.ffwd(self.ln2(x))


class GPTLanguageModel(nn.Module):

  def __init__(self):
    super().__init__()
    self.token_embedding_table = nn.Embedding(V, C)
    self.position_embedding_table = nn.Embedding(T, C)
    self.blocks = nn.Sequential(*[Block() for _ in range(L)])
    self.ln_f = nn.LayerNorm(C)
    self.lm_head = nn.Linear(C, V)

  def forward(self, idx):
    x = self.token_embedding_table(idx) + self.position_embedding_table(
        torch.arange(idx.shape[1]))
    return self.lm_head(self.ln_f(self.blocks(x)))


class BigramLanguageModel(nn.Module):

  def __init__(self):
    super().__init__()
    self.token_embedding_table = nn.Embedding(V, V)

  def forward(self, idx):
    return self.token_embedding_table(idx)


# -- nanoGPT's layout and the fused one: the project's PyTorch twin at the tiny size.

def _twin(**options):
  return torch_twin.GPT(torch_twin.TwinConfig(vocab_size=V, block_size=T, n_embed=C, n_heads=H,
                                              n_layer=L, **options))


# The twin's names (nanoGPT's) -> a fused one-file GPT's: `tok`, `blocks.{i}.att.qkv`, ...
_FUSED = ((r"^transformer\.wte\.", "tok."), (r"^transformer\.wpe\.", "pos."),
          (r"^transformer\.h\.", "blocks."), (r"\.ln_(\d)\.", r".ln\1."),
          (r"\.attn\.c_attn\.", ".att.qkv."), (r"\.attn\.c_proj\.", ".att.proj."),
          (r"\.mlp\.c_fc\.", ".mlp.0."), (r"\.mlp\.c_proj\.", ".mlp.2."),
          (r"^transformer\.ln_f\.", "lnf."), (r"^lm_head\.", "head."))


def _fused_names(state_dict):
  def rename(name):
    for pattern, new in _FUSED:
      name = re.sub(pattern, new, name)
    return name
  return {rename(k): v for k, v in state_dict.items()}


def _torch_model(kind, bias=True):
  """(logits function, module) with random weights far from any init, in eval mode."""
  torch.manual_seed(0)
  if kind in ("fused", "nanogpt"):  # the lecture's model, or nanoGPT's options
    options = (dict(activation="gelu", bias=bias, qkv_bias=bias, tie_embeddings=True)
               if kind == "nanogpt" else {})
    model = _twin(**options)
    forward = lambda idx: model(idx)[0]  # noqa: E731
  else:
    model = GPTLanguageModel() if kind == "lecture" else BigramLanguageModel()
    forward = model
  with torch.no_grad():
    for module in model.modules():
      for name, p in module.named_parameters(recurse=False):
        layer_norm = isinstance(module, (nn.LayerNorm, torch_twin.LayerNorm))
        one = 1.0 if layer_norm and name == "weight" else 0.0
        p.copy_(one + 0.2 * torch.randn_like(p))
  model.eval()
  return forward, model


def _config(kind):
  return bigram_config.get_config() if kind == "bigram" else frost_cpu.get_config()


def _model_cfg(kind):
  config = _config(kind)
  if kind != "bigram":
    config.model.update(block_size=T, n_embed=C, n_heads=H, n_layer=L)
  return ModelConfig.from_config(config.model, V)


def _state_dict(model):
  """The state_dict as its layout names it: a twin standing for the fused GPT renamed."""
  state_dict = model.state_dict()
  if isinstance(model, torch_twin.GPT) and not model.config.tie_embeddings:
    state_dict = _fused_names(state_dict)
  return state_dict


def _numpy(model):
  return {k: v.numpy() for k, v in _state_dict(model).items()}


def _torch_greedy(forward, block_size, prompt, num_tokens):
  """The lecture's generate with argmax: crop to block_size, take the last logits."""
  idx = torch.from_numpy(TOKENIZER.encode(prompt)).long()[None, :]
  with torch.no_grad():
    for _ in range(num_tokens):
      next_id = forward(idx[:, -block_size:])[:, -1, :].argmax(dim=-1, keepdim=True)
      idx = torch.cat((idx, next_id), dim=1)
  return TOKENIZER.decode(idx[0].tolist())


def _logits_diff(kind, forward, params, cfg):
  idx_BT = np.random.default_rng(0).integers(0, V, size=(3, cfg.block_size))
  with torch.no_grad():
    expected_BTV = forward(torch.tensor(idx_BT, dtype=torch.long)).numpy()
  logits_BTV = build_model(cfg).apply({"params": params}, idx_BT)
  return float(np.max(np.abs(np.asarray(logits_BTV) - expected_BTV)))


@pytest.mark.parametrize("kind", ["lecture", "fused", "bigram"])
def test_imported_params_give_torchs_logits(kind):
  forward, model = _torch_model(kind)
  cfg = _model_cfg(kind)
  params = torch_import.convert(_numpy(model), cfg)
  fresh = init_params(build_model(cfg), jax.random.PRNGKey(0))
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)  # noqa: E731
  assert shapes(params) == shapes(fresh)
  assert _logits_diff(kind, forward, params, cfg) < 1e-4


def _cli(script, *args, check=True):
  result = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  if check and result.returncode != 0:
    raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
  return result


def _files(tmp_path, model):
  """The state_dict as torch.save writes it, the text, and its vocab.json."""
  pt, text, vocab = tmp_path / "model.pt", tmp_path / "input.txt", tmp_path / "vocab.json"
  torch.save(_state_dict(model), pt)
  text.write_text(TEXT)
  vocab.write_text(json.dumps(TOKENIZER.to_json()))
  return pt, text, vocab


@pytest.mark.parametrize("kind,vocab_flag", [("lecture", "text"), ("fused", "vocab"),
                                             ("bigram", "text")])
def test_imported_workdir_samples_torchs_greedy_text(kind, vocab_flag, tmp_path):
  forward, model = _torch_model(kind)
  pt, text, vocab = _files(tmp_path, model)
  workdir = tmp_path / "imported"
  config = "configs/bigram.py" if kind == "bigram" else "configs/frost_cpu.py"
  sizes = [] if kind == "bigram" else SIZES
  source = f"--text={text}" if vocab_flag == "text" else f"--vocab={vocab}"
  _cli("import_torch.py", f"--state_dict={pt}", source, f"--config={config}", *sizes,
       f"--workdir={workdir}")
  assert json.loads((workdir / "vocab.json").read_text()) == TOKENIZER.to_json()
  cfg, params, _, step = restore.load(workdir)[1:]
  assert step == 0 and _logits_diff(kind, forward, params, cfg) < 1e-4
  num_tokens = cfg.block_size - len(PROMPT)  # never past the window: no crop policy differs
  result = _cli("sample.py", f"--workdir={workdir}", f"--prompt={PROMPT}",
                f"--num_tokens={num_tokens}", "--top_k=1")
  assert result.stdout == _torch_greedy(forward, cfg.block_size, PROMPT, num_tokens) + "\n"


@pytest.mark.parametrize("change,needles", [
    ({"n_embed": 64}, ["'token_embedding_table.weight'", f"[{V}, 32]", f"[{V}, 64]"]),
    ({"n_layer": 3}, ["no tensor 'blocks.2.ln1.weight'"]),
    ({"n_layer": 1}, ["that a model with", "'blocks.1.", "does not use"]),
    ({"n_heads": 4}, ["'blocks.0.sa.heads.0.query.weight'", "[16, 32]", "[8, 32]"]),
    ({"block_size": 8}, ["'position_embedding_table.weight'", "[16, 32]", "[8, 32]"]),
])
def test_a_state_dict_that_does_not_fit_names_the_tensor(change, needles):
  _, model = _torch_model("lecture")
  cfg = _model_cfg("lecture")
  cfg = dataclasses.replace(cfg, **change)
  with pytest.raises(UserError) as e:
    torch_import.convert(_numpy(model), cfg)
  assert "\n" not in str(e.value)
  for needle in needles:
    assert needle in str(e.value)


def test_only_the_mask_buffers_are_ignored():
  _, model = _torch_model("lecture")
  state_dict = _numpy(model)
  assert any(k.endswith(".tril") for k in state_dict)
  with pytest.raises(UserError, match="'extra.weight'"):
    torch_import.convert({**state_dict, "extra.weight": np.zeros(3)}, _model_cfg("lecture"))
  compiled = {"_orig_mod." + k: v for k, v in state_dict.items()}  # torch.compile's names
  torch_import.convert(compiled, _model_cfg("lecture"))
  with pytest.raises(UserError, match="neither token_embedding_table.weight"):
    torch_import.convert({"weight": np.zeros(3)}, _model_cfg("lecture"))


def test_import_cli_errors_are_one_line(tmp_path):
  _, model = _torch_model("lecture")
  pt, text, vocab = _files(tmp_path, model)
  args = ["--config=configs/frost_cpu.py", *SIZES, f"--workdir={tmp_path / 'w'}"]
  cases = [
      ([f"--state_dict={pt}", f"--text={text}", "--config.model.n_embed=64"],
       ["'token_embedding_table.weight'", f"[{V}, 32]", f"[{V}, 64]"]),
      ([f"--state_dict={pt}", f"--text={text}", f"--vocab={vocab}"], ["exactly one of"]),
      ([f"--state_dict={pt}"], ["exactly one of"]),
      ([f"--state_dict={tmp_path / 'missing.pt'}", f"--text={text}"],
       ["missing.pt does not exist"]),
      ([f"--state_dict={pt}", f"--text={tmp_path / 'missing.txt'}"],
       ["missing.txt does not exist"]),
      ([f"--state_dict={text}", f"--text={text}"], ["cannot read", "state_dict()"]),
      ([f"--state_dict={pt}", f"--ckpt={pt}", f"--text={text}"],
       ["exactly one of --state_dict"]),
      ([f"--ckpt={pt}", f"--text={text}"], ["no 'model' and 'model_args'", "--state_dict"]),
  ]
  for extra, needles in cases:
    assert_one_line_error(_cli("import_torch.py", *args, *extra, check=False), *needles)
  assert not (tmp_path / "w").exists()  # no error leaves a half-made workdir
  _cli("import_torch.py", *args, f"--state_dict={pt}", f"--text={text}")
  assert_one_line_error(_cli("import_torch.py", *args, f"--state_dict={pt}", f"--text={text}",
                       check=False), "already holds checkpoints")


# -- nanoGPT: ckpt.pt (model, model_args, optimizer, ...) and data/shakespeare_char's meta.pkl.

def _nanogpt_files(tmp_path, bias, compiled=False):
  """(forward, ckpt.pt, meta.pkl) as nanoGPT's train.py and prepare.py write them."""
  forward, model = _torch_model("nanogpt", bias)
  state_dict = model.state_dict()
  for i in range(L):  # the causal mask nanoGPT saves without flash attention: not a weight
    state_dict[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
  assert "lm_head.weight" in state_dict
  if compiled:  # torch.compile's names, as train.py saves them
    state_dict = {"_orig_mod." + k: v for k, v in state_dict.items()}
  optimizer = torch.optim.AdamW(model.parameters())
  forward(torch.zeros((1, 4), dtype=torch.long)).sum().backward()
  optimizer.step()  # a real optimizer state: tensors and plain values
  ckpt, meta = tmp_path / "ckpt.pt", tmp_path / "meta.pkl"
  torch.save({"model": state_dict, "optimizer": optimizer.state_dict(),
              "model_args": dict(n_layer=L, n_head=H, n_embd=C, block_size=T, bias=bias,
                                 vocab_size=V, dropout=0.0),
              "iter_num": 250, "best_val_loss": torch.tensor(1.47),
              "config": {"dataset": "shakespeare_char", "compile": compiled}}, ckpt)
  chars = sorted(set(TEXT))
  with meta.open("wb") as f:
    pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                 "stoi": {c: i for i, c in enumerate(chars)}}, f)
  return forward, ckpt, meta


def test_imported_runs_keep_float32_unless_asked():
  assert imported.imported_dtype("auto") == "float32"
  assert imported.imported_dtype("bfloat16") == "bfloat16"


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_ckpt_gives_torchs_logits_and_greedy_text(bias, tmp_path):
  """The launcher's steps in-process: torch.load(weights_only), meta.pkl, model_args, convert."""
  forward, ckpt, meta = _nanogpt_files(tmp_path, bias, compiled=bias)
  obj = torch.load(ckpt, map_location="cpu", weights_only=True)
  tokenizer = torch_import.read_meta(meta)
  assert tokenizer.chars == TOKENIZER.chars
  config = frost_cpu.get_config()
  config.model.update(torch_import.nanogpt_model(obj["model_args"], V, str(ckpt)))
  cfg = ModelConfig.from_config(config.model, V)
  assert (cfg.activation, cfg.bias, cfg.qkv_bias, cfg.tie_embeddings, cfg.n_layer) == (
      "gelu", bias, bias, True, L)
  params = torch_import.convert({k: v.numpy() for k, v in obj["model"].items()}, cfg)
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)  # noqa: E731
  fresh = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
  assert shapes(params) == shapes(fresh) and "lm_head" not in params
  assert _logits_diff("nanogpt", forward, params, cfg) < 1e-4
  num_tokens = 20  # past block_size 16: our naive decode crops as torch's loop does
  prompt_BP = TOKENIZER.encode(PROMPT)[None, :]
  ours = sampling.make_generate(cfg, "naive")(params, prompt_BP, jax.random.key(0), num_tokens,
                                               top_k=1)
  assert PROMPT + TOKENIZER.decode(np.asarray(ours)[0]) == _torch_greedy(
      forward, T, PROMPT, num_tokens)


def test_nanogpt_ckpt_cli_imports_a_workdir_that_samples_torchs_text(tmp_path, monkeypatch):
  """The one CLI run: --ckpt and --meta with a config that has none of nanoGPT's sizes. The
  run is saved in float32, so it decodes in float32 where "auto" would pick bfloat16."""
  forward, ckpt, meta = _nanogpt_files(tmp_path, bias=False)
  workdir = tmp_path / "imported"
  result = _cli("import_torch.py", f"--ckpt={ckpt}", f"--meta={meta}",
                "--config=configs/frost_cpu.py", f"--workdir={workdir}")
  assert "n_layer=2, n_heads=2, n_embed=32, block_size=16, bias=False" in result.stderr
  assert "nanogpt layout" in result.stderr
  assert json.loads((workdir / "config.json").read_text())["model"]["dtype"] == "float32"
  bf16_auto = lambda setting: precision.Choice("bfloat16" if setting == "auto" else setting,
                                               "a CPU with bfloat16 units")
  monkeypatch.setattr(precision, "choose", bf16_auto)  # as "auto" may choose elsewhere
  monkeypatch.setattr(precision, "choose_decode", bf16_auto, raising=False)
  cfg, params, tokenizer, step = restore.load(workdir)[1:]
  assert step == 0 and tokenizer.chars == TOKENIZER.chars
  assert cfg.dtype == "float32"  # decodes as PyTorch computed, whatever "auto" would pick
  assert (cfg.activation, cfg.bias, cfg.tie_embeddings, cfg.block_size) == ("gelu", False,
                                                                             True, T)
  assert _logits_diff("nanogpt", forward, params, cfg) < 1e-4
  num_tokens = T - len(PROMPT)  # the KV decode's window is the crop's up to block_size
  ours = sampling.make_generate(cfg)(params, TOKENIZER.encode(PROMPT)[None, :],
                                     jax.random.key(0), num_tokens, top_k=1)
  assert PROMPT + TOKENIZER.decode(np.asarray(ours)[0]) == _torch_greedy(
      forward, T, PROMPT, num_tokens)


def _nanogpt_cfg(**change):
  return dataclasses.replace(_model_cfg("lecture"), **{
      "activation": "gelu", "bias": False, "tie_embeddings": True, **change})


def test_nanogpt_layout_checks_the_options_and_the_tied_head():
  _, model = _torch_model("nanogpt", bias=False)
  state_dict = _numpy(model)
  for cfg, needles in [
      (_nanogpt_cfg(activation="relu"), ["nanogpt layout (without biases) has "
                                         "config.model.activation='gelu'",
                                         "pass --config.model.activation=gelu"]),
      (_nanogpt_cfg(bias=True, qkv_bias=True), ["config.model.bias=False and "
                                                "config.model.qkv_bias=False",
                                                "--config.model.bias=False "
                                                "--config.model.qkv_bias=False"]),
      (_nanogpt_cfg(position="rope"), ["--config.model.position=learned"])]:
    with pytest.raises(UserError) as e:
      torch_import.convert(state_dict, cfg)
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)
  untied = {**state_dict, "lm_head.weight": state_dict["lm_head.weight"] + 1}
  with pytest.raises(UserError, match="not tied; pass --config.model.tie_embeddings=False"):
    torch_import.convert(untied, _nanogpt_cfg())
  # An untied config copies the head: its own lm_head, with a zero bias where bias is on.
  params = torch_import.convert(untied, _nanogpt_cfg(tie_embeddings=False))
  np.testing.assert_array_equal(params["lm_head"]["kernel"], untied["lm_head.weight"].T)
  assert "bias" not in params["lm_head"]
  without_head = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
  assert "lm_head" not in torch_import.convert(without_head, _nanogpt_cfg())


def test_lecture_layouts_name_the_options_they_lack():
  _, model = _torch_model("lecture")
  cfg = dataclasses.replace(_model_cfg("lecture"), activation="gelu", tie_embeddings=True)
  with pytest.raises(UserError) as e:
    torch_import.convert(_numpy(model), cfg)
  assert str(e.value) == (
      "the lecture layout has config.model.activation='relu' and "
      "config.model.tie_embeddings=False; pass --config.model.activation=relu "
      "--config.model.tie_embeddings=False")


def test_nanogpt_model_args_must_fit_a_char_vocabulary():
  args = dict(n_layer=L, n_head=H, n_embd=C, block_size=T, bias=False, vocab_size=50304,
              dropout=0.1)
  with pytest.raises(UserError, match="vocab_size=50304 but the vocabulary has 26 characters"):
    torch_import.nanogpt_model(args, 26, "ckpt.pt")
  with pytest.raises(UserError, match="model_args has n_head=None"):
    torch_import.nanogpt_model({**args, "n_head": None}, 50304, "ckpt.pt")
  assert torch_import.nanogpt_model(args, 50304, "ckpt.pt")["dropout"] == 0.1


class _RunsACommand:
  """What a malicious pickle holds: unpickling it would call os.system."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_meta_pkl_runs_no_code_and_must_be_a_char_vocabulary(tmp_path):
  marker, path = tmp_path / "ran", tmp_path / "meta.pkl"
  itos = dict(enumerate("abc"))
  good = {"vocab_size": 3, "itos": itos, "stoi": {c: i for i, c in itos.items()}}
  for obj, needle in [
      ({**good, "x": _RunsACommand(marker)}, "names the Python global posix.system"),
      (collections.OrderedDict(good), "names the Python global collections.OrderedDict"),
      ({**good, "itos": {0: "a", 1: "bc", 2: "d"}}, "not a character meta.pkl"),
      ({**good, "stoi": {"a": 1, "b": 0, "c": 2}}, "not a character meta.pkl"),
      ({**good, "vocab_size": 4}, "not a character meta.pkl"),
      ([1, 2], "not a character meta.pkl")]:
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(UserError) as e:
      torch_import.read_meta(path)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not marker.exists()  # nothing was executed
  path.write_bytes(pickle.dumps(good)[:-5])
  with pytest.raises(UserError, match="is not a pickle"):
    torch_import.read_meta(path)
  # ids are itos's, whatever their order
  path.write_bytes(pickle.dumps({"itos": {0: "b", 1: "a"}, "stoi": {"b": 0, "a": 1}}))
  assert torch_import.read_meta(path).encode("ab").tolist() == [1, 0]
