"""The model's products in its compute dtype, forward and both backward products.

In bfloat16 (or float16) a product takes both operands in that dtype and
accumulates in float32, as torch.autocast's. Autodiff alone would not keep
that backward: the cotangent of a float32 result is float32, and its
transposes would promote the other operand to a float32 product. So every
product here has a custom VJP that casts the cotangent to the compute dtype,
and forms dx and dW as products of that dtype too.

With the CPU tricks, one more thing: XLA:CPU runs a bfloat16 dot only where
YNNPACK takes it, which wants the left operand to contract over its minor
(last) dimensions in row-major layout; any other dot is upcast to float32
(and a transpose folded back into the dot brings a bfloat16 dot XLA cannot
run at all). Backward products such as dW = x^T dy contract over the rows of
both operands, so one operand is copied transposed first (`_transposed_copy`),
in the compute dtype, in a form XLA does not fold away.

In float32 the product is the plain einsum of today, bit for bit.

Owns: `einsum`, `dot_general`. May import: JAX only.
"""

import functools
import math
import string

import jax
import jax.numpy as jnp
from jax import lax


def einsum(spec: str, a, b, dtype, tricks: bool = False) -> jax.Array:
  """`jnp.einsum(spec, a, b)` of operands cast to `dtype`, accumulated and returned in float32.

  Two operands, every index of each either in the other or in the output;
  `tricks`: backward products in the forms XLA:CPU keeps in `dtype`.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
  return _einsum(spec, dtype, bool(tricks), (a.dtype, b.dtype), a, b)


def dot_general(a, b, dimension_numbers, dtype, tricks: bool = False) -> jax.Array:
  """`lax.dot_general` as `einsum` does it: operands in `dtype`, float32 result."""
  return einsum(_spec(dimension_numbers, a.ndim, b.ndim), a, b, dtype, tricks)


def _spec(dimension_numbers, a_ndim: int, b_ndim: int) -> str:
  """The einsum spec of a dot_general: output batch, then a's free, then b's free dims."""
  (a_contract, b_contract), (a_batch, b_batch) = dimension_numbers
  letters = iter(string.ascii_letters)
  a_s = [next(letters) for _ in range(a_ndim)]
  b_s = [next(letters) for _ in range(b_ndim)]
  for i, j in zip((*a_contract, *a_batch), (*b_contract, *b_batch)):
    b_s[j] = a_s[i]
  out = ([a_s[i] for i in a_batch]
         + [c for i, c in enumerate(a_s) if i not in (*a_contract, *a_batch)]
         + [c for j, c in enumerate(b_s) if j not in (*b_contract, *b_batch)])
  return f"{''.join(a_s)},{''.join(b_s)}->{''.join(out)}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _einsum(spec, dtype, tricks, in_dtypes, a, b):
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _einsum_fwd(spec, dtype, tricks, in_dtypes, a, b):
  a, b = a.astype(dtype), b.astype(dtype)  # kept in `dtype`: half the memory in bfloat16
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32), (a, b)


def _einsum_bwd(spec, dtype, tricks, in_dtypes, residuals, g):
  """Both gradients as `dtype` x `dtype` products accumulating in float32."""
  a, b = residuals
  ins, out = spec.split("->")
  a_s, b_s = ins.split(",")
  g = g.astype(dtype)
  da = _product(f"{out},{b_s}->{a_s}", g, b, tricks)
  db = _product(f"{a_s},{out}->{b_s}", a, g, tricks)
  return da.astype(in_dtypes[0]), db.astype(in_dtypes[1])


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def _product(spec: str, x, y, tricks: bool, swap: bool = True) -> jax.Array:
  """einsum(spec, x, y) in float32, as a dot whose left operand contracts over its last dims.

  The left operand is the one whose free dims lead the output, so XLA need
  not swap the two to lay the result out; if its contracted dims are not
  last, it is transposed first: with `tricks` copied (`_transposed_copy`),
  so XLA:CPU keeps the dot in the operands' dtype, else plainly (XLA:CPU
  then multiplies in float32, where a folded transpose could not run).
  With `tricks`, where copying the other operand and transposing the result
  moves fewer elements, the product is formed that way round (an MLP
  projection's dW = h^T dy as (dy^T h)^T: dy is a quarter of h's size).
  """
  ins, out = spec.split("->")
  x_s, y_s = ins.split(",")
  contracted = [c for c in y_s if c in x_s and c not in out]
  batch = [c for c in x_s if c in y_s and c in out]
  first_free = next(c for c in out if c not in batch)
  if first_free not in x_s:
    x_s, y_s, x, y = y_s, x_s, y, x
  if set(x_s[len(x_s) - len(contracted):]) != set(contracted):
    sizes = dict(zip(x_s, x.shape)) | dict(zip(y_s, y.shape))
    y_free = [c for c in out if c in y_s and c not in batch]
    y_moves = y.size if set(y_s[len(y_s) - len(contracted):]) != set(contracted) else 0
    if tricks and swap and y_free and y_moves + math.prod(sizes[c] for c in out) < x.size:
      swapped = "".join(batch + y_free + [c for c in out if c in x_s and c not in batch])
      r = _product(f"{y_s},{x_s}->{swapped}", y, x, tricks, swap=False)
      # The barrier: a transpose folded into the dot sends it to XLA's DotThunk,
      # which has no bf16 kernel (the module docstring).
      return jnp.transpose(lax.optimization_barrier(r), [swapped.index(c) for c in out])
    order = ([i for i, c in enumerate(x_s) if c not in contracted]
             + [x_s.index(c) for c in contracted])  # y's order of the contracted dims
    x = _transposed_copy(x, order) if tricks else jnp.transpose(x, order)
    x_s = "".join(x_s[i] for i in order)
  return jnp.einsum(f"{x_s},{y_s}->{out}", x, y, preferred_element_type=jnp.float32)


def _transposed_copy(x, order):
  """jnp.transpose(x, order), written out in row-major layout.

  XLA gives a plain transpose the layout that makes it free, and its
  consumers then read x column-major, so a dot of it is upcast; a
  concatenation of the transposed halves has to be materialized.
  """
  x = jnp.transpose(x, order)
  if x.shape[0] < 2:
    return x
  half = x.shape[0] // 2
  return lax.concatenate([x[:half], x[half:]], 0)
