"""Where a train step's time goes: a `jax.profiler` trace's op times summed by model part.

`benchmark.py --op_time` traces a few compiled calls of the train step it
timed and reads the trace back with that executable's own HLO text: each op
the trace names is a fusion or instruction there, and its opcodes and the
`op_name` JAX wrote into its metadata (`.../block_1/attn/Dropout_0/...`,
`transpose(jvp(GPT))` for the backward pass) say what it is part of. The
parts, in the order they are tried:

  products     any fusion holding a dot (YNNPACK's too): the matmuls and einsums
  optimizer    the update (ops outside the model, the loss and the batch's draw)
  dropout      the masks' threefry hash, their bits, the mask multiplies
  casts        conversions between float32 and the compute dtype alone
  copies       copies, transposes and concatenations alone (the products'
               transposed operands among them)
  layernorm    LayerNorm forward and backward
  softmax      the attention scores' scale, causal mask and softmax, both ways
  other        the rest: activations, residual adds, embeddings, the loss

Times are milliseconds a step summed over the threads that ran the ops, so
they may add to more than the step's wall time; compare parts, and the same
part between runs. XLA:CPU's traces name every op; a GPU's trace names its
kernels, not always the HLO's instructions, so there most time lands in
`other`.

Owns: reading a trace and an HLO text into times by part. May import: JAX.
"""

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax

PARTS = ("products", "optimizer", "dropout", "casts", "copies", "layernorm", "softmax",
         "other")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = \S+ ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_MOVES = {"copy", "transpose", "concatenate", "slice", "bitcast", "reshape", "broadcast",
          "parameter", "tuple", "get-tuple-element", "fusion", "constant"}
# Runtime events of XLA:CPU's executor, not ops of the program.
_NOT_OPS = ("ThunkExecutor", "$", "Slinky", "CommonPjRt", "PjRt", "Pjit", "Parse",
            "Allocate", "Wait for", "Handle input", "PythonRef", "Threadpool", "end:")


def trace_calls(run, state, calls: int):
  """Runs `state = run(state)[0]` `calls` times inside a trace: (state, the events)."""
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory)
    try:
      for _ in range(calls):
        state, metrics = run(state)
        jax.block_until_ready(metrics)
    finally:
      jax.profiler.stop_trace()
    found = sorted(Path(directory).glob("plugins/profile/*/*.trace.json.gz"))
    events = json.loads(gzip.decompress(found[-1].read_bytes()))["traceEvents"] if found else []
  return state, events


def by_part(events: list, hlo_text: str, steps: int) -> dict:
  """Milliseconds a step per part (PARTS), from trace events of `steps` steps."""
  instructions, computations = _parse(hlo_text)
  totals = dict.fromkeys(PARTS, 0.0)
  for event in events:
    name = event.get("name", "")
    if event.get("ph") != "X" or name.startswith(_NOT_OPS) or name not in instructions:
      continue
    totals[_part(name, instructions, computations)] += event.get("dur", 0) / 1e3 / steps
  return totals


def _parse(hlo_text: str):
  """{instruction: (opcode, its line)} and {computation: [its instructions' lines]}."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    if not line.startswith(" ") and (m := _COMPUTATION.match(line)):
      current = m.group(1)
    elif m := _INSTRUCTION.match(line):
      instructions[m.group(1)] = (m.group(2), line)
      computations[current].append((m.group(2), line))
  return instructions, computations


def _opcodes(line: str, computations, depth: int = 0) -> set:
  """The opcodes of the computations an instruction calls, nested fusions included."""
  found = set()
  for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
    for opcode, inner in computations.get(called, ()):
      found.add(opcode)
      if depth < 4:
        found |= _opcodes(inner, computations, depth + 1)
  return found


def _op_name(line: str, computations) -> str:
  """The op_name JAX gave an instruction: for a fusion, the first of its own and its
  instructions' (root first) that is inside the model, else the first that names an op."""
  names = _op_names(line, computations)
  inside = [name for name in names if "GPT" in name]
  named = [name for name in names if not re.search(r"(closed_call|while|body)$", name)]
  return (inside or named or [""])[0]


def _op_names(line: str, computations, depth: int = 0) -> list:
  names = re.findall(r'op_name="([^"]*)"', line)
  for called in re.findall(r"calls=%?([\w.\-]+)", line) if depth < 4 else ():
    for _, inner in sorted(computations.get(called, ()), key=lambda op: "ROOT" not in op[1]):
      names += _op_names(inner, computations, depth + 1)
  return names


def _part(name: str, instructions, computations) -> str:
  opcode, line = instructions[name]
  if opcode in ("while", "call", "conditional"):
    return "other"  # their bodies' ops are in the trace themselves
  ops = {opcode} | _opcodes(line, computations)
  where = _op_name(line, computations)
  if ops & {"dot", "convolution"}:
    return "products"
  if "GPT" not in where:  # the loss, the batch's draw, the optimizer
    outside_model = not where or re.search(r"jvp\(|randint|threefry", where)
    return "other" if outside_model else "optimizer"
  if "Dropout" in where:
    return "dropout"
  if "convert" in ops and ops <= _MOVES | {"convert"}:
    return "casts"
  if ops <= _MOVES:
    return "copies"
  if re.search(r"/ln(\d+|_f)\b", where):
    return "layernorm"
  if "/attn/" in where:
    return "softmax"
  return "other"
