"""minigpt_jax.products: bf16 products in the programs JAX emits and XLA:CPU compiles, and
gradients equal to plain autodiff's."""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minigpt_jax import products, train
from minigpt_jax.model import ModelConfig, build_model, cross_entropy, init_cache, init_params

_EMITTED = re.compile(r"stablehlo\.dot(?:_general)?\b.*:\s*\(tensor<[^>]*x(\w+)>,\s*"
                      r"tensor<[^>]*x(\w+)>\)")
_COMPILED = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[[^\]]*\]\S*\s+([\w\-]+)\(([^)]*)\)")


def emitted_dots(text: str) -> Counter:
  """(lhs, rhs) element types of every dot of a lowered (StableHLO) program."""
  return Counter(m.groups() for m in map(_EMITTED.search, text.splitlines()) if m)


def compiled_dots(text: str) -> Counter:
  """(lhs, rhs) element types of every dot of a compiled HLO module, fusions included."""
  types, dots = {}, []
  for line in text.splitlines():
    m = _COMPILED.match(line)
    if m:
      name, dtype, op, args = m.groups()
      types[name] = dtype
      if op == "dot":
        dots.append([a.strip().lstrip("%") for a in args.split(",")][:2])
  return Counter(tuple(types[a] for a in pair) for pair in dots)


def _cfg(dtype="bfloat16", tricks=True, **kw):
  return ModelConfig("gpt", vocab_size=65, block_size=16, n_embed=32, n_heads=2, n_layer=2,
                     dtype=dtype, cpu_tricks=tricks, dropout=0.1, **kw)


def _train_step(cfg):
  """A jitted loss-and-grad of a tiny GPT with dropout, lowered: the train step's products."""
  model = build_model(cfg)
  params = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
  idx_BT = jnp.zeros((4, cfg.block_size), jnp.int32)
  loss = lambda p, key: cross_entropy(model.apply({"params": p}, idx_BT, deterministic=False,
                                                  rngs={"dropout": key}), idx_BT)
  return jax.jit(jax.value_and_grad(loss)).lower(params, jax.random.key(1))


def _only(dots: Counter, dtype: str, count: int):
  assert dots == Counter({(dtype, dtype): count}), dots


@pytest.mark.parametrize("dtype, short", [("bfloat16", "bf16"), ("float16", "f16")])
@pytest.mark.parametrize("tricks", [False, True], ids=["tricks_off", "tricks_on"])
def test_the_emitted_train_step_multiplies_only_in_the_compute_dtype(tricks, dtype, short):
  """What every backend receives: 3 products a Linear (9) and an attention einsum (4),
  forward, dx and dW, none with a float32 operand, with the tricks on or off."""
  _only(emitted_dots(_train_step(_cfg(dtype, tricks)).as_text()), short, 3 * (9 + 4))


@pytest.mark.parametrize("options", [{}, dict(tie_embeddings=True, position="rope",
                                              activation="gelu", bias=False)],
                         ids=["lecture", "nanogpt"])
def test_xla_cpu_compiles_the_bf16_train_step_without_upcasting(options):
  """With the tricks on, XLA:CPU keeps every product bf16 (its YNNPACK dots take bf16 on
  any x86 CPU, bf16 units or not, here an AVX2-only one), and the step runs."""
  lowered = _train_step(_cfg(**options))
  if jax.default_backend() != "cpu":
    pytest.skip("the compiled check is XLA:CPU's")
  compiled = lowered.compile()
  if "__ynn_fusion" not in compiled.as_text():
    pytest.skip("this XLA:CPU build hands no dot to YNNPACK, so it upcasts every bf16 dot")
  _only(compiled_dots(compiled.as_text()), "bf16", 3 * (9 + 4))
  params = init_params(build_model(_cfg(**options)), jax.random.key(0))
  loss, _ = compiled(params, jax.random.key(1))
  assert np.isfinite(float(loss))


@pytest.mark.parametrize("tricks", [False, True], ids=["tricks_off", "tricks_on"])
def test_eval_step_and_decoder_multiply_in_bf16(tricks, tiny_config):
  """The eval step's and the KV decoder's forward products (prefill and one token) are
  bf16 x bf16 as emitted."""
  tiny_config.model.update(dtype="bfloat16", cpu_tricks="on" if tricks else "off")
  state = train.create_train_state(tiny_config, 65)
  windows_BT1 = jnp.zeros((4, tiny_config.model.block_size + 1), jnp.int32)
  lowered = jax.jit(train.eval_step).lower(state, state.params, windows_BT1)
  _only(emitted_dots(lowered.as_text()), "bf16", 9 + 4)
  cfg = _cfg(tricks=tricks)
  model = build_model(cfg)
  params = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
  decode = jax.jit(lambda p, idx, pos, cache: model.apply({"params": p}, idx, cache=cache,
                                                          pos=pos))
  for T in (5, 1):
    text = decode.lower(params, jnp.zeros((1, T), jnp.int32), 3, init_cache(cfg, 1)).as_text()
    _only(emitted_dots(text), "bf16", 9 + 4)


@pytest.mark.parametrize("spec, shapes", [
    ("mk,kn->mn", [(6, 5), (5, 7)]),
    ("mk,kn->mn", [(6, 7), (7, 2)]),  # with the tricks, dW from a copy of dy^T, the smaller
    ("bqhd,bkhd->bhqk", [(2, 4, 3, 5), (2, 4, 3, 5)]),
    ("bhqk,bkhd->bqhd", [(2, 3, 4, 4), (2, 4, 3, 5)]),
    ("btc,vc->btv", [(2, 3, 5), (7, 5)]),
])
@pytest.mark.parametrize("tricks", [False, True], ids=["tricks_off", "tricks_on"])
def test_the_custom_vjp_gives_autodiff_s_gradients(spec, shapes, tricks):
  """In bf16, value and both gradients equal autodiff's of the same einsum taken in float32
  from the bf16-rounded operands and cotangent, to bf16 rounding of the results."""
  rng = np.random.default_rng(0)
  a, b = (rng.normal(size=s).astype(np.float32) for s in shapes)
  out = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), a, b)
  g = rng.normal(size=out.shape).astype(np.float32)
  bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  y, vjp = jax.vjp(lambda a, b: products.einsum(spec, a, b, "bfloat16", tricks), a, b)
  want_y, want_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), bf(a), bf(b))
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(g), want_vjp(bf(g)), strict=True):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dot_general_is_its_einsum_and_float32_is_untouched():
  """nn.Dense's dot_general dims map to the einsum they mean; float32 takes no custom VJP."""
  assert products._spec((((2,), (0,)), ((), ())), 3, 2) == "abc,ce->abe"
  assert products._spec((((3,), (3,)), ((0, 2), (0, 2))), 4, 4) == "abcd,afcd->acbf"
  a = jnp.ones((3, 4))
  jaxpr = jax.make_jaxpr(lambda a: products.einsum("mk,kn->mn", a, a.T, jnp.float32))(a)
  assert "custom_vjp" not in str(jaxpr)
