"""Shared config defaults and `validate`, which fails before anything compiles.

Config files in `configs/` start from `get_config()` here and change only the
fields that differ, so every run has every field. `config.model` is declared
by `model.ModelConfig` and the optimizer's part of `config.train` by
`optimizer.OptimizerConfig` (default, meaning and check on one line each,
settings.py); the other fields are declared here.

Owns: the defaults, every check of a config (alone, against the data, the
devices, or a checkpoint's saved config). May import: ml_collections, data,
model, optimizer, settings, tokenizer, errors.
"""

import importlib.util
from pathlib import Path

import ml_collections

from minigpt_jax import data, model, optimizer, settings, tokenizer
from minigpt_jax.errors import UserError


def get_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment; each field overridable on the CLI.

  The declarations are looked up at each call, so a test can swap in a
  `model.ModelConfig` with one more field.
  """
  config = ml_collections.ConfigDict()
  config.seed = 1337  # root PRNG seed: init, batches, dropout, eval batches

  config.data = ml_collections.ConfigDict()
  config.data.corpus = "frost"  # a name in minigpt_jax/corpora.json
  config.data.path = ""  # any UTF-8 text file; wins over `corpus` when set
  config.data.train_fraction = 0.9  # the rest is the validation split
  # Batches are drawn on device from ids every device holds, unless on_device
  # is False or the ids (as int32) pass device_budget_mb: then windows are
  # gathered on the host from the arrays or memmaps (batches.py), same windows.
  config.data.on_device = True
  config.data.device_budget_mb = 1024
  # A folder of launch/prepare.py (train.bin, val.bin, tokenizer.json, meta.json);
  # wins over path and corpus. Empty: corpus or path, prepared once into a cache.
  config.data.tokens = ""
  config.data.tokenizer = "char"  # "char" (the text's characters) | "bpe" (byte-level)
  config.data.vocab_size = 0  # bpe: tokens, 256 (the bytes) or more; char: 0 (n/a)

  config.model = ml_collections.ConfigDict(settings.defaults(model.ModelConfig))

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16
  config.train.steps = 5000  # optimizer updates
  config.train.update(settings.defaults(optimizer.OptimizerConfig))
  # Micro-batches of batch_size / K rows per update, their gradients averaged:
  # the same update as the whole batch, in less memory.
  config.train.grad_accum_steps = 1
  # Stop (saving) when val has not improved for N evaluations; 0: off.
  config.train.early_stop_evals = 0
  config.train.eval_interval = 500  # steps between loss estimates/checkpoints
  config.train.eval_at_start = True  # also estimate the losses of the untrained model
  # "sampled": the lecture's estimate, eval_iters random batches per split.
  # "full": every val token scored once (evaluation.py), exact and the same on
  # any device count; train is scored on fixed, evenly spaced windows.
  config.train.eval_mode = "sampled"
  config.train.eval_iters = 200  # sampled: batches averaged per split per estimate
  # full: tokens between val windows (1..block_size); None: block_size. Smaller
  # strides give each scored token more context.
  config.train.eval_stride = ml_collections.config_dict.placeholder(int)
  # full: train windows scored, evenly spaced; None: as many as val has.
  config.train.eval_train_windows = ml_collections.config_dict.placeholder(int)
  config.train.log_every = 50  # steps between progress-bar loss updates
  config.train.sample_tokens = 500  # sample printed at the end (0: none)
  # Optimizer steps per compiled call (a lax.scan); same results, less dispatch
  # overhead for small models. Logging and evaluation happen between calls.
  config.train.steps_per_dispatch = 1
  # Trace N steps after the first (compiling) call with jax.profiler into
  # <workdir>/profile/, for TensorBoard's profile plugin and Perfetto; 0: off.
  config.train.profile_steps = 0
  # Transfer (transfer.py): start from the params of another run's workdir (ours,
  # or one import_torch.py or import_hf.py wrote); step, optimizer state, schedule
  # and corpus start fresh. Used once: a rerun resumes the run's own checkpoint.
  config.train.init_from = ""
  config.train.init_from_step = "best"  # "best" | "latest" | a step number, e.g. "950"

  # Devices: a data x fsdp mesh (parallel.py). The batch is split over both axes;
  # along fsdp each weight matrix and its optimizer state are split too (FSDP).
  # Counts of devices; -1: the rest (data -1 and fsdp 1: plain data parallelism).
  config.parallel = ml_collections.ConfigDict()
  config.parallel.data = -1
  config.parallel.fsdp = 1

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.keep = 3  # latest checkpoints kept, plus the best one

  # Where metrics go besides metrics.jsonl and TensorBoard (metrics.py).
  config.metrics = ml_collections.ConfigDict()
  config.metrics.wandb_project = ""  # a Weights & Biases project (pip install wandb); "": off
  return config


EVAL_MODES = ("sampled", "full")


def _require(ok: bool, field: str, problem: str, fix: str) -> None:
  if not ok:
    raise UserError(f"config.{field} {problem}; {fix}")


def _check_declared(declaration, section: str, values) -> None:
  """The one-field checks of a declaration's `setting`s (model.py, optimizer.py)."""
  for field in settings.declared(declaration):
    check, value = field.metadata["check"], values[field.name]
    fix = check(value) if check else None
    _require(fix is None, f"{section}.{field.name}", f"is {value!r}", fix)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked without data; raises UserError naming the field.

  The one-field checks of config.model and the optimizer come with their
  declarations; the checks across fields are here.
  """
  m, t = config.model, config.train
  _check_declared(model.ModelConfig, "model", m)
  _check_declared(optimizer.OptimizerConfig, "train", t)
  for field, value in (("train.batch_size", t.batch_size),
                       ("train.steps", t.steps),
                       ("train.eval_interval", t.eval_interval),
                       ("train.eval_iters", t.eval_iters),
                       ("train.log_every", t.log_every),
                       ("train.steps_per_dispatch", t.steps_per_dispatch),
                       ("checkpoint.keep", config.checkpoint.keep)):
    _require(isinstance(value, int) and value > 0, field,
             f"is {value!r}", "set it to a positive integer")
  _require(t.eval_mode in EVAL_MODES, "train.eval_mode", f"is {t.eval_mode!r}",
           f"use one of {', '.join(EVAL_MODES)}")
  stride = t.eval_stride
  _require(stride is None or (isinstance(stride, int) and 1 <= stride <= m.block_size),
           "train.eval_stride", f"is {stride!r}",
           f"use a stride from 1 to config.model.block_size ({m.block_size}), or leave it "
           "unset for block_size")
  windows = t.eval_train_windows
  _require(windows is None or (isinstance(windows, int) and windows > 0),
           "train.eval_train_windows", f"is {windows!r}",
           "use a positive count, or leave it unset for as many as val has")
  for field, value in (("train.eval_at_start", t.eval_at_start),
                       ("data.on_device", config.data.on_device)):
    _require(isinstance(value, bool), field, f"is {value!r}", "use True or False")
  _require(m.n_embed % m.n_heads == 0, "model.n_embed",
           f"({m.n_embed}) is not divisible by config.model.n_heads ({m.n_heads})",
           "choose n_embed as a multiple of n_heads")
  if m.position == "rope":
    _require((m.n_embed // m.n_heads) % 2 == 0, "model.position",
             f"is 'rope' but the head size n_embed / n_heads = {m.n_embed // m.n_heads} is odd",
             "choose n_embed and n_heads with an even head size")
  _require(0.0 <= t.beta1 < 1.0 and 0.0 <= t.beta2 < 1.0, "train.beta1/beta2",
           f"are {t.beta1!r}/{t.beta2!r}", "use values in [0, 1)")
  _require(0.0 <= t.min_learning_rate <= t.learning_rate, "train.min_learning_rate",
           f"is {t.min_learning_rate!r}",
           f"use a value from 0 to train.learning_rate ({t.learning_rate!r})")
  _require(isinstance(t.warmup_steps, int) and 0 <= t.warmup_steps < t.steps,
           "train.warmup_steps", f"is {t.warmup_steps!r}",
           f"use 0 or a count below train.steps ({t.steps})")
  _require(isinstance(t.grad_accum_steps, int) and t.grad_accum_steps > 0,
           "train.grad_accum_steps", f"is {t.grad_accum_steps!r}",
           "set it to a positive integer")
  _require(t.batch_size % t.grad_accum_steps == 0, "train.batch_size",
           f"({t.batch_size}) does not divide into config.train.grad_accum_steps "
           f"({t.grad_accum_steps}) micro-batches",
           "use a batch_size that is a multiple of grad_accum_steps")
  _require(isinstance(t.early_stop_evals, int) and t.early_stop_evals >= 0,
           "train.early_stop_evals", f"is {t.early_stop_evals!r}",
           "use 0 (off) or a positive count of evaluations")
  _require(isinstance(t.profile_steps, int) and t.profile_steps >= 0,
           "train.profile_steps", f"is {t.profile_steps!r}",
           "use 0 (off) or a positive count of steps to trace")
  _require(isinstance(t.init_from, str), "train.init_from", f"is {t.init_from!r}",
           "use a run's workdir, or \"\" to start from scratch")
  _require(str(t.init_from_step) in ("best", "latest") or str(t.init_from_step).isdigit(),
           "train.init_from_step", f"is {t.init_from_step!r}",
           'use "best", "latest" or a step number of the init_from run')
  _require(t.sample_tokens >= 0, "train.sample_tokens",
           f"is {t.sample_tokens!r}", "use 0 (no sample) or a positive count")
  budget = config.data.device_budget_mb
  _require(isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0,
           "data.device_budget_mb", f"is {budget!r}",
           "use a positive size in MB (or config.data.on_device=False for the host path)")
  _require(0.0 < config.data.train_fraction < 1.0, "data.train_fraction",
           f"is {config.data.train_fraction!r}", "use a fraction in (0, 1)")
  wandb_project = config.get("metrics", {}).get("wandb_project", "")
  if wandb_project and importlib.util.find_spec("wandb") is None:
    raise UserError(f"config.metrics.wandb_project is {wandb_project!r} but wandb is not "
                    "installed; pip install 'wandb>=0.31,<0.32', or drop "
                    "--config.metrics.wandb_project")
  d = config.data
  _require(d.tokenizer in tokenizer.KINDS, "data.tokenizer", f"is {d.tokenizer!r}",
           f"use one of {', '.join(tokenizer.KINDS)}")
  if d.tokenizer == "bpe":
    least = tokenizer.min_bpe_vocab()
    _require(isinstance(d.vocab_size, int) and d.vocab_size >= least, "data.vocab_size",
             f"is {d.vocab_size!r}, too small for byte-level BPE (the 256 bytes come first)",
             f"set it to {least} or more")
  else:
    _require(d.vocab_size == 0, "data.vocab_size",
             f"is {d.vocab_size!r} but config.data.tokenizer is 'char' (its vocabulary is "
             "the text's characters)", "set it to 0, or use --config.data.tokenizer=bpe")
  if not config.data.path and not config.data.tokens:
    names = data.corpus_names()
    _require(config.data.corpus in names, "data.corpus",
             f"is {config.data.corpus!r}",
             f"use one of {', '.join(names)} or set config.data.path to a text file")


def validate_for_data(config: ml_collections.ConfigDict, train_len: int,
                      val_len: int) -> None:
  """Checks that need the split sizes: every split must hold one window."""
  block = config.model.block_size
  for split, length in (("train", train_len), ("val", val_len)):
    _require(length > block, "model.block_size",
             f"({block}) is not shorter than the {split} split ({length} tokens)",
             f"lower block_size below {length} or use a longer text")


def validate_for_devices(config: ml_collections.ConfigDict, num_devices: int,
                         num_processes: int = 1) -> tuple[int, int]:
  """(data, fsdp) device counts of the mesh; the batch must split evenly across them."""
  p = config.parallel
  for field in ("data", "fsdp"):
    value = p[field]
    _require(value == -1 or (isinstance(value, int) and 1 <= value <= num_devices),
             f"parallel.{field}", f"is {value!r} but there are {num_devices} devices",
             f"use -1 (the rest) or a count from 1 to {num_devices}")
  _require(not (p.data == -1 and p.fsdp == -1), "parallel.data",
           "and config.parallel.fsdp are both -1", "set one of them to a device count")
  data, fsdp = p.data, p.fsdp
  if fsdp == -1:
    _require(num_devices % data == 0, "parallel.data", f"({data}) does not divide the "
             f"{num_devices} devices", "use a divisor of the device count, or set "
             "config.parallel.fsdp")
    fsdp = num_devices // data
  _require(num_devices % fsdp == 0, "parallel.fsdp", f"({fsdp}) does not divide the "
           f"{num_devices} devices", "use a divisor of the device count")
  if data == -1:
    data = num_devices // fsdp
  shards = data * fsdp
  _require(shards <= num_devices, "parallel.data",
           f"x config.parallel.fsdp is {data} x {fsdp} = {shards} but there are "
           f"{num_devices} devices", f"use counts whose product is at most {num_devices}")
  _require(num_processes == 1 or shards == num_devices, "parallel.data",
           f"x config.parallel.fsdp is {shards} but {num_processes} processes hold "
           f"{num_devices} devices", "use -1 for one of them so every process takes part")
  _require(config.train.batch_size % shards == 0, "train.batch_size",
           f"({config.train.batch_size}) does not divide by the {shards} devices of the "
           f"{data} x {fsdp} (data x fsdp) mesh",
           f"use a multiple of {shards} or fewer devices (config.parallel)")
  accum = config.train.grad_accum_steps
  _require(config.train.batch_size % (shards * accum) == 0, "train.batch_size",
           f"({config.train.batch_size}) does not divide into {shards} devices of "
           f"{accum} micro-batches (config.train.grad_accum_steps)",
           f"use a multiple of {shards * accum}")
  return data, fsdp


def _model_differs(saved_model: dict, config, fix: str, what: str) -> None:
  """A UserError naming the model fields (`fits` in model.ModelConfig) that differ.

  Those fix parameter shapes or the computation. A saved config without a
  field (an older version's) has the default's value.
  """
  defaults = get_config()
  differ = {}
  for field in (f.name for f in settings.declared(model.ModelConfig, "fits")):
    saved = saved_model.get(field, defaults.model[field])
    if saved != config.model[field]:
      differ[field] = saved
  if differ:
    first = next(iter(differ))
    more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
    flags = " ".join(f"--config.model.{f}={v!r}" for f, v in differ.items())
    raise UserError(f"{what} has config.model.{first}={differ[first]!r}{more} but this "
                    f"config has {config.model[first]!r}; pass {flags} {fix}")


def _same_path(a: str, b: str) -> bool:
  return a == b or (bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve())


def check_source_fits(saved_config: dict, config, where: str) -> None:
  """Raises UserError naming the model field in which `config` differs from the
  run it starts from (config.train.init_from). Dropout, dtype and the optimizer may differ.
  """
  _model_differs(saved_config["model"], config,
                 "(the model of that run) or set config.train.init_from to a run of this "
                 "model", f"the run in config.train.init_from ({where})")


def check_fits(saved_config: dict, saved_vocab: dict, config, vocab: dict,
               where: str) -> None:
  """Raises UserError naming the model fields, optimizer field, vocabulary or
  init_from that differ between a checkpoint's saved config and `config`.
  """
  defaults = get_config()
  _model_differs(saved_config["model"], config, "or use a new --workdir",
                 f"checkpoint in {where}")
  started_from = saved_config.get("train", {}).get("init_from", "")
  if not _same_path(started_from, config.train.init_from):
    raise UserError(
        f"checkpoint in {where} has config.train.init_from={started_from!r} but this config "
        f"has {config.train.init_from!r}; a run starts from init_from once, at step 0: pass "
        f"--config.train.init_from={started_from!r} to resume it, or use a new --workdir")
  field = optimizer.layout_change(saved_config["train"], config.train,
                                  saved_config["model"].get("dtype", defaults.model.dtype),
                                  config.model.dtype)
  if field is not None:
    section, name = field.split(".")
    saved = saved_config[section].get(name, defaults[section][name])
    raise UserError(
        f"checkpoint in {where} has config.{field}={saved!r} but this config has "
        f"{config[section][name]!r}, which changes the optimizer state's layout; pass "
        f"--config.{field}={saved!r} or use a new --workdir")
  saved_tok, tok = tokenizer.from_json(saved_vocab), tokenizer.from_json(vocab)
  if saved_tok != tok:
    raise UserError(
        f"checkpoint in {where} was trained with a different vocabulary "
        f"({saved_tok.describe()}) than this run's ({tok.describe()}); train on the same "
        "corpus and tokenizer (config.data) or use a new --workdir")


def check_same_corpus(saved_meta: dict, name: str, sha256: str, where: str) -> None:
  """Raises UserError when a checkpoint was trained on another text than `config.data` reads.

  Checkpoints of older versions saved no sha256: they resume unchecked.
  """
  saved = saved_meta.get("corpus_sha256")
  if saved and sha256 and saved != sha256:
    raise UserError(
        f"checkpoint in {where} was trained on {saved_meta.get('corpus', 'another text')} "
        f"(sha256 {saved[:12]}) but this config reads {name} (sha256 {sha256[:12]}); a run "
        "resumes only on its own text: rerun with its config.data, or train on the new text "
        f"from its weights in a new --workdir with --config.train.init_from={where}")
