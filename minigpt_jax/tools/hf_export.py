"""A checkpoint as a folder that `transformers` loads: weights, configs, tokenizer, card.

`export(workdir, out, ...)` writes into `out` (new, or empty):
model.safetensors (float32), config.json, generation_config.json,
tokenizer.json and tokenizer_config.json, README.md (the model card), and,
for a model GPT-2's architecture cannot hold, modeling_minigpt.py, copied
from this package. The folder is written under a temporary name and renamed
when complete. Needs `safetensors` (numpy only: no torch, no transformers).

Owns: `export`, the model card. May import: restore, checkpoint, data,
metrics, hf_weights, hf_config, hf_tokenizer, hf_deps, errors.
"""

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from minigpt_jax import data
from minigpt_jax.errors import UserError
from minigpt_jax.support import checkpoint, metrics, restore
from minigpt_jax.tools import hf_config, hf_deps, hf_tokenizer, hf_weights

MODELING_SOURCE = Path(__file__).resolve().parent / hf_config.MODELING_FILE


class Exported(NamedTuple):
  out: Path
  step: int
  native: bool  # model_type gpt2; else minigpt with trust_remote_code


def _check_out(out: Path) -> None:
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out {out} already exists and is not empty; remove it or pick "
                    "another --out")


def _corpus(config: dict, workdir: Path) -> tuple[str, str]:
  """(the corpus' name or path, its sha256 or "unknown") of a run's config."""
  d = config.get("data", {})
  if d.get("tokens"):
    meta = Path(d["tokens"]) / "meta.json"
    if meta.is_file():
      source = json.loads(meta.read_text())["source"]
      return source["name"], source["sha256"]
    return d["tokens"], "unknown"
  if d.get("path"):
    path = Path(d["path"])
    return d["path"], data.file_sha256(path) if path.is_file() else "unknown"
  try:
    return d.get("corpus", "?"), data.corpus_sha256(d.get("corpus"))
  except KeyError:
    return str(d.get("corpus")), "unknown"


def _bpc(loss, workdir: Path, tok, key: str):
  """Bits per character of a loss: summary.json's, or from the loss for characters."""
  summary = workdir / "summary.json"
  if summary.is_file():
    saved = json.loads(summary.read_text()).get(key)
    if saved is not None:
      return saved
  return metrics.bits_per_char(loss) if tok.kind == "char" else None


def _started_from(meta: dict) -> list[str]:
  """The card's line on the run this one started from (config.train.init_from), if any."""
  source = meta.get("init_from")
  if not source:
    return []
  val = source.get("val_loss")
  return [f"- started from: {source['workdir']} at step {source['step']} (val loss "
          f"{'n/a' if val is None else f'{val:.4f}'} on {source['corpus']}), then trained "
          "on this corpus"]


def card(loaded: restore.Loaded, meta: dict, workdir: Path, native: bool,
         command: str) -> str:
  """The model card: what the model is, what it was trained on, how well, how it was made."""
  cfg, tok = loaded.model_cfg, loaded.tokenizer
  corpus, sha = _corpus(loaded.config, workdir)
  best, best_step = restore.best_of(meta)
  fmt = lambda x: "n/a" if x is None else f"{x:.4f}"
  trust = "" if native else ", trust_remote_code=True"
  model = {k: v for k, v in loaded.config.get("model", {}).items()}
  return "\n".join([
      "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [minigpt_jax]",
      "---", "", f"# {workdir.name}", "",
      f"A {cfg.name} language model trained with minigpt_jax, exported at step "
      f"{loaded.step}.", "",
      f"- architecture: {'GPT-2 (model_type gpt2, no custom code)' if native else 'minigpt (modeling_minigpt.py, trust_remote_code=True)'}",
      f"- tokenizer: {tok.describe()}",
      f"- corpus: {corpus}, sha256 {sha}",
      f"- steps: {loaded.step}",
      f"- val loss at this step: {fmt(meta.get('val_loss'))}",
      f"- best val loss: {fmt(best)} (step {best_step}), "
      f"{fmt(_bpc(best, workdir, tok, 'best_val_bpc'))} bits per character",
      *_started_from(meta),
      f"- made by: `{command}`", "",
      "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
      f"model = AutoModelForCausalLM.from_pretrained(DIR{trust})",
      f"tokenizer = AutoTokenizer.from_pretrained(DIR{trust})", "```", "",
      "## config.model", "", "```json", json.dumps(model, indent=2, sort_keys=True), "```",
      ""])


def export(workdir: Path, out: Path, step: int | None = None, best: bool = False,
           command: str = "") -> Exported:
  """Writes the folder (see the module docstring); every check comes before any write."""
  save_file = hf_deps.require("safetensors.numpy", "launch/export_hf.py").save_file
  _check_out(out)
  loaded = restore.load(workdir, step=step, best=best)
  cfg, tok = loaded.model_cfg, loaded.tokenizer
  tokenizer_json, tokenizer_config = hf_tokenizer.to_hf(tok, cfg.block_size)
  mngr = checkpoint.manager(workdir)
  try:
    meta = checkpoint.restore_json(mngr, loaded.step)[2]
  finally:
    mngr.close()
  native = hf_weights.is_native(cfg)
  params = jax.tree_util.tree_map(np.asarray, jax.device_get(loaded.params))
  tensors = hf_weights.to_gpt2(params, cfg) if native else hf_weights.to_minigpt(params)
  eos = hf_tokenizer.eos_id(tok)
  tmp = out.parent / f".{out.name}.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write = lambda name, obj: (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    write("config.json", hf_config.hf_config(cfg, native, eos))
    write("generation_config.json", hf_config.generation_config(cfg, native, eos))
    write("tokenizer_config.json", tokenizer_config)
    (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (tmp / "README.md").write_text(card(loaded, meta, Path(workdir), native, command))
    if not native:
      shutil.copyfile(MODELING_SOURCE, tmp / hf_config.MODELING_FILE)
    if out.is_dir():
      out.rmdir()  # empty, checked above
    tmp.rename(out)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise UserError(f"could not write {out}: {e.strerror or e}; free disk space or make the "
                    "folder writable, then rerun") from None
  return Exported(out, loaded.step, native)
