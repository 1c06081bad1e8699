"""Tests for minigpt_jax.config and the experiment files in configs/."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from minigpt_jax import config as config_lib, model, optimizer, settings
from minigpt_jax.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIGS.glob("*.py") if p.name != "__init__.py")


def _load(name: str):
  """get_config() of configs/<name>.py, skipping the test if the file is absent."""
  path = CONFIGS / f"{name}.py"
  if not path.is_file():
    pytest.skip(f"{path} does not exist yet")
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_config_files_found():
  """The glob below must not silently parametrize over nothing."""
  assert "frost_cpu" in [p.stem for p in CONFIG_FILES]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_file_validates(path):
  """A shipped config that fails validation would fail before training starts."""
  config = _load(path.stem)
  config_lib.validate(config)
  # Every file starts from the shared defaults, so it has every field.
  base = config_lib.get_config()
  for section in ("data", "model", "train", "checkpoint", "metrics"):
    assert set(config[section].keys()) == set(base[section].keys()), section


def _check(config, section: str, **expected):
  got = {k: config[section][k] for k in expected}
  assert got == expected


def test_frost_t4_is_the_seed_notebook():
  config = _load("frost_t4")
  assert config.data.corpus == "frost"
  _check(config, "model", name="gpt", block_size=128, n_embed=256, n_heads=4,
         n_layer=4, dropout=0.2)
  _check(config, "train", batch_size=64, learning_rate=3e-4, steps=5000,
         eval_interval=500, eval_iters=200)


def test_frost_cpu_is_the_lecture_cpu_size():
  config = _load("frost_cpu")
  assert config.data.corpus == "frost"
  _check(config, "model", name="gpt", block_size=32, n_embed=64, n_heads=4,
         n_layer=4, dropout=0.0)
  _check(config, "train", batch_size=16, learning_rate=1e-3, steps=5000)


def test_bigram_is_the_lecture_bigram():
  config = _load("bigram")
  _check(config, "model", name="bigram", block_size=8)
  _check(config, "train", batch_size=32, learning_rate=1e-2, steps=3000,
         eval_interval=300)


def test_shakespeare_char_is_the_lecture_gpt():
  config = _load("shakespeare_char")
  assert config.data.corpus == "shakespeare"
  _check(config, "model", name="gpt", block_size=256, n_embed=384, n_heads=6,
         n_layer=6, dropout=0.2)
  _check(config, "train", batch_size=64, learning_rate=3e-4, steps=5000)


LECTURE_CONFIGS = ("bigram", "frost_cpu", "frost_t4", "shakespeare_char")


@pytest.mark.parametrize("name", LECTURE_CONFIGS)
def test_the_lecture_configs_keep_the_lecture_recipe(name):
  """torch.optim.AdamW's defaults at a constant rate, ReLU, biases, an untied head."""
  config = _load(name)
  _check(config, "train", beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
         weight_decay_on="all", schedule="constant", warmup_steps=0, grad_clip=0.0,
         grad_accum_steps=1, optimizer="adamw", early_stop_evals=0)
  _check(config, "model", activation="relu", bias=True, tie_embeddings=False,
         position="learned")


def test_only_frost_cpu_pins_its_dtype():
  """Its PyTorch reference figures are float32; the others' parity holds in bfloat16 too."""
  for path in CONFIG_FILES:
    assert _load(path.stem).model.dtype == ("float32" if path.stem == "frost_cpu" else "auto")


def test_shakespeare_char_nanogpt_is_nanogpts_recipe():
  """nanoGPT's config/train_shakespeare_char.py and its train.py defaults."""
  config = _load("shakespeare_char_nanogpt")
  assert config.data.corpus == "shakespeare" and config.data.train_fraction == 0.9
  _check(config, "model", block_size=256, n_embed=384, n_heads=6, n_layer=6, dropout=0.2,
         activation="gelu", bias=False, tie_embeddings=True, position="learned")
  _check(config, "train", batch_size=64, steps=5000, learning_rate=1e-3, schedule="cosine",
         warmup_steps=100, min_learning_rate=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1,
         weight_decay_on="matrices", grad_clip=1.0, grad_accum_steps=1, eval_interval=250,
         eval_iters=200)


def test_defaults_validate():
  config_lib.validate(config_lib.get_config())


def _invalid(**changes):
  """The default config with `section.field=value` changes applied."""
  config = config_lib.get_config()
  for dotted, value in changes.items():
    section, field = dotted.split("__")
    config[section][field] = value
  return config


@pytest.mark.parametrize("changes, words", [
    ({"model__n_embed": 65}, ["model.n_embed", "n_heads"]),
    ({"model__n_embed": 64, "model__n_heads": 3}, ["model.n_embed", "n_heads"]),
    ({"model__block_size": 0}, ["model.block_size"]),
    ({"train__batch_size": -1}, ["train.batch_size"]),
    ({"model__n_layer": 0}, ["model.n_layer"]),
    ({"model__n_heads": 0}, ["model.n_heads"]),
    ({"data__corpus": "nope"}, ["data.corpus", "'nope'", "frost"]),
    ({"model__name": "lstm"}, ["model.name", "'lstm'", "bigram", "gpt"]),
    ({"model__dtype": "float64"}, ["model.dtype", "'float64'", "auto", "bfloat16", "float16"]),
    ({"model__dropout": 1.0}, ["model.dropout"]),
    ({"model__dropout": -0.1}, ["model.dropout"]),
    ({"train__learning_rate": 0.0}, ["train.learning_rate"]),
    ({"data__train_fraction": 1.0}, ["data.train_fraction"]),
    ({"train__schedule": "step"}, ["train.schedule", "'step'", "cosine", "wsd"]),
    ({"train__optimizer": "sgd"}, ["train.optimizer", "adamw", "muon"]),
    ({"train__weight_decay_on": "biases"}, ["train.weight_decay_on", "matrices"]),
    ({"train__warmup_steps": 5000}, ["train.warmup_steps", "below train.steps (5000)"]),
    ({"train__min_learning_rate": 1.0}, ["train.min_learning_rate", "train.learning_rate"]),
    ({"train__grad_clip": -1.0}, ["train.grad_clip"]),
    ({"train__grad_accum_steps": 3}, ["train.batch_size (16)", "grad_accum_steps (3)"]),
    ({"train__early_stop_evals": -1}, ["train.early_stop_evals"]),
    ({"train__profile_steps": -1}, ["train.profile_steps"]),
    ({"model__activation": "tanh"}, ["model.activation", "gelu"]),
    ({"model__position": "alibi"}, ["model.position", "rope"]),
    ({"model__n_embed": 12, "model__n_heads": 4, "model__position": "rope"},
     ["model.position", "head size", "odd"]),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else None)
def test_validate_names_the_field(changes, words):
  """The launcher prints the message as one `error:` line, so it must name the field."""
  with pytest.raises(UserError) as e:
    config_lib.validate(_invalid(**changes))
  msg = str(e.value)
  for word in words:
    assert word in msg, (word, msg)
  assert "\n" not in msg


def test_unknown_corpus_is_fine_with_path():
  """data.path wins over data.corpus, so the corpus name is not checked."""
  config = _invalid(data__corpus="nope", data__path="/some/file.txt")
  config_lib.validate(config)


@pytest.mark.parametrize("block, ok", [(99, True), (100, False), (150, False)])
def test_validate_for_data_block_vs_val_split(block, ok):
  """Each split must hold at least one window of block_size + 1 characters."""
  config = _invalid(model__block_size=block)
  if ok:
    config_lib.validate_for_data(config, train_len=900, val_len=100)
    return
  with pytest.raises(UserError) as e:
    config_lib.validate_for_data(config, train_len=900, val_len=100)
  msg = str(e.value)
  assert "model.block_size" in msg and "val" in msg and "100" in msg
  assert "\n" not in msg


def test_validate_for_data_checks_train_split_too():
  config = _invalid(model__block_size=50)
  with pytest.raises(UserError, match=r"model\.block_size.*train split"):
    config_lib.validate_for_data(config, train_len=50, val_len=1000)


def test_check_fits_reads_a_saved_config_without_the_options_as_the_lecture_s():
  """Checkpoints from before the recipe options fit the defaults, and name the field otherwise."""
  saved = config_lib.get_config().to_dict()
  for field in ("activation", "bias", "qkv_bias", "tie_embeddings", "position"):
    del saved["model"][field]
  vocab = {"chars": "ab"}
  config_lib.check_fits(saved, vocab, config_lib.get_config(), vocab, "runs/old")
  config = _invalid(model__tie_embeddings=True)
  with pytest.raises(UserError, match="config.model.tie_embeddings=False"):
    config_lib.check_fits(saved, vocab, config, vocab, "runs/old")
  config = _invalid(model__activation="gelu", model__bias=False, model__n_layer=2)
  with pytest.raises(UserError, match=r"config.model.n_layer=4 \(and 2 more\) but this config "
                                      r"has 2; pass --config.model.n_layer=4 "
                                      r"--config.model.activation='relu' --config.model.bias=True "
                                      r"or use a new --workdir"):
    config_lib.check_fits(saved, vocab, config, vocab, "runs/old")


def test_a_model_field_declared_once_reaches_config_model_config_and_check_fits(monkeypatch):
  """One `setting` line: get_config's default, validate's check, from_config, check_fits."""
  @dataclasses.dataclass(frozen=True)
  class WithGates(model.ModelConfig):
    n_gates: int = settings.setting(2, "gates per block", check=settings.positive_int,
                                    fits=True)

  monkeypatch.setattr(model, "ModelConfig", WithGates)
  config = config_lib.get_config()
  assert config.model.n_gates == 2
  config_lib.validate(config)
  assert WithGates.from_config(config.model, 65).n_gates == 2
  config.model.n_gates = 0
  with pytest.raises(UserError, match=r"config.model.n_gates is 0; set it to a positive integer"):
    config_lib.validate(config)
  config.model.n_gates = 3
  assert WithGates.from_config(config.model, 65).n_gates == 3
  saved, vocab = config_lib.get_config().to_dict(), {"chars": "ab"}
  with pytest.raises(UserError, match=r"config.model.n_gates=2 but this config has 3; "
                                      r"pass --config.model.n_gates=2 or use a new --workdir"):
    config_lib.check_fits(saved, vocab, config, vocab, "runs/old")
  del saved["model"]["n_gates"]  # a checkpoint from before the field: its default
  assert WithGates.from_config(saved["model"], 65).n_gates == 2
  config.model.n_gates = 2
  config_lib.check_fits(saved, vocab, config, vocab, "runs/old")


def test_the_declarations_give_the_config_and_read_it_back():
  """config.model and the optimizer's train fields come from their dataclasses."""
  config = config_lib.get_config()
  assert dict(config.model) == settings.defaults(model.ModelConfig)
  assert "vocab_size" not in config.model  # the corpus', not a setting
  for name, default in settings.defaults(optimizer.OptimizerConfig).items():
    assert config.train[name] == default, name
  cfg = model.ModelConfig.from_config(config.model, 65)
  assert isinstance(cfg.cpu_tricks, bool) and cfg.vocab_size == 65
  assert cfg == model.ModelConfig.from_config(config.model.to_dict(), 65)
  fits = {f.name for f in settings.declared(model.ModelConfig, "fits")}
  assert fits == {"name", "block_size", "n_embed", "n_heads", "n_layer", "activation", "bias",
                  "qkv_bias", "tie_embeddings", "position"}
  layout = [f.name for f in settings.declared(optimizer.OptimizerConfig, "layout")]
  assert layout == ["optimizer", "schedule", "weight_decay_on", "grad_clip",
                    "skip_nonfinite_updates"]
  for field in (*settings.declared(model.ModelConfig),
                *settings.declared(optimizer.OptimizerConfig)):
    assert "\n" not in field.metadata["meaning"], field.name
