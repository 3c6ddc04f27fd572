"""Activation checkpointing (rematerialization) and host-offload policies for the blocks of
:class:`effjax.nn.DecoderLM` and :class:`effjax.nn.LongConvLM`.

``DecoderLM(remat=spec)`` / ``LongConvLM(remat=spec)`` wrap every block in ``jax.checkpoint``
with the policy that ``spec`` names (:func:`parse_remat`):

* ``"none"``: no checkpointing; the backward reads every activation the forward kept.
* ``"full"``: only each block's input is kept; the backward reruns the whole block first,
  attention forward included (activation memory ``O(layers * batch * seq * d_model)``).
* ``"dots"``: keep the results of matrix multiplications without batch dimensions (the
  projections and MLP matmuls); the backward recomputes the elementwise work and the attention.
* ``"save_names(a, b, ...)"``: keep only the named activations (the names a block emits:
  :data:`DECODER_ACTIVATIONS`, :data:`LONG_CONV_ACTIVATIONS`), recompute the rest.
* ``"offload_names(a, b, ..., to=pinned_host)"``: as ``save_names``, but the named activations
  are copied to host memory in the forward and back in the backward
  (``jax.checkpoint_policies.save_and_offload_only_these_names``; they show as ``<host>``
  residuals). Worth it where the host link is fast next to the recompute it saves (TPU, GH200).
  On the CPU backend host and device memory are one, so there it changes nothing but the copies.
* ``"save_attention"`` = ``save_names(flash_attention_output, flash_attention_lse)``:
  LightSeq's rematerialization-aware checkpointing (Li et al. 2023). The attention output and LSE
  (tagged by every flash attention implementation and by ring attention,
  :mod:`pallas_kernels.flash_attention.residuals`) are kept, so the rerun block recomputes the
  projections, norms and MLP but never the attention forward: the FlashAttention backward needs
  only q, k, v (cheap to recompute) and those two. Memory over ``"full"``: the output
  ``[batch, seq, heads, head_dim]`` in the compute dtype and the float32 LSE ``[batch, heads, seq]``
  per layer. LightSeq reports 1.24-2.01x faster training than Megatron-LM with this and its ring.
* ``"offload_attention"`` = ``offload_names(flash_attention_output, flash_attention_lse)``.
* ``"tokenwise(alpha)"``: MEMO's token-wise recomputation (Zhao et al. 2024, SIGMOD'25), for
  attention blocks. The token-local work of a block (norms, q/k/v and output projections, MLP) runs
  separately on the first ``ceil(alpha * seq)`` positions, whose activations are all kept (tagged
  ``<name>@kept``), and on the rest, whose activations are recomputed; the attention output and
  LSE of every position are kept as in ``save_attention``, so the attention forward never reruns.
  ``alpha = 0`` keeps what ``save_attention`` keeps, ``alpha = 1`` every token-local activation;
  memory and recompute move linearly in between. MEMO keeps (offloads) the alpha fraction in host
  memory and picks alpha so that its transfer hides behind compute; it reports 1.97x / 1.80x the
  MFU of Megatron-LM / DeepSpeed and 1M-token training of a 7B model on 8 A800s.

:func:`effjax.nn.plan_remat` picks, for a given step and memory budget, the policy with the least
recompute that fits (``model.remat: auto`` in ``train_lm``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import fractions
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jex_core

from pallas_kernels.flash_attention import residuals

KEPT_SUFFIX = "@kept"
"""Suffix of the activations that ``tokenwise(alpha)`` keeps (its first ceil(alpha * seq) tokens)."""

MLP_ACTIVATIONS = ("mlp_norm", "mlp_gate", "mlp_up", "mlp_hidden")
"""Named activations of a pre-norm SwiGLU half: the norm output, the gate and up projections and
``silu(gate) * up`` (the down projection's input)."""

TOKEN_LOCAL_ACTIVATIONS = ("attention_norm", "query", "key", "value", "attention_projection",
                           *MLP_ACTIVATIONS)
"""Per-token activations of a decoder block (everything but the attention itself), the ones
``tokenwise`` splits: the attention norm output, the q/k/v projections (before qk-norm and RoPE)
and the output projection."""

DECODER_ACTIVATIONS = (*TOKEN_LOCAL_ACTIVATIONS, residuals.OUTPUT, residuals.LSE)
"""Every name a :class:`effjax.nn.DecoderLM` block emits."""

LONG_CONV_ACTIVATIONS = ("mixer_norm", "mixer_input", "long_conv_output", *MLP_ACTIVATIONS)
"""Every name a :class:`effjax.nn.LongConvLM` block emits: the mixer's norm output, the
convolution's input (LongConv: the tiled norm output; H3: the fused q/k/v projection) and the
long convolution's output."""

FIXED_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_RESIDUALS = (residuals.OUTPUT, residuals.LSE)
ALIASES = {"save_attention": f"save_names({', '.join(ATTENTION_RESIDUALS)})",
           "offload_attention": f"offload_names({', '.join(ATTENTION_RESIDUALS)})"}
REMAT_POLICIES = (*FIXED_POLICIES, *ALIASES)
"""The policies without arguments (besides ``save_names``, ``offload_names`` and ``tokenwise``)."""
OFFLOAD_DESTINATION = "pinned_host"
SPEC_FORMS = (f"{', '.join(REMAT_POLICIES)}, save_names(name, ...), "
              "offload_names(name, ..., to=pinned_host) or tokenwise(alpha)")

_name_suffix = contextvars.ContextVar("effjax_remat_name_suffix", default="")


@dataclasses.dataclass(frozen=True)
class Remat:
  """A parsed remat spec (:func:`parse_remat`).

  Attributes:
    kind: ``none``, ``full``, ``dots``, ``save_names``, ``offload_names`` or ``tokenwise``.
    names: the activations ``save_names`` / ``offload_names`` keep.
    alpha: the fraction of positions ``tokenwise`` keeps, as an exact fraction.
  """
  kind: str
  names: tuple[str, ...] = ()
  alpha: fractions.Fraction = fractions.Fraction(0)

  def policy(self) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy (None: do not checkpoint)."""
    if self.kind in FIXED_POLICIES:
      return FIXED_POLICIES[self.kind]
    if self.kind == "save_names":
      return jax.checkpoint_policies.save_only_these_names(*self.names)
    if self.kind == "offload_names":
      return jax.checkpoint_policies.save_and_offload_only_these_names(
          names_which_can_be_saved=[], names_which_can_be_offloaded=list(self.names),
          offload_src="device", offload_dst=OFFLOAD_DESTINATION)
    kept = [name + KEPT_SUFFIX for name in TOKEN_LOCAL_ACTIVATIONS]
    return jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUALS, *kept)

  @property
  def tokenwise(self) -> fractions.Fraction | None:
    """``alpha`` for ``tokenwise(alpha)``, else None."""
    return self.alpha if self.kind == "tokenwise" else None

  def check_emitted(self, emitted: Sequence[str], model: str, argument: str | None = None
                    ) -> None:
    """Raises if a named activation is not one that ``model``'s blocks emit (the error names
    ``argument``, default ``<model>.remat``)."""
    for name in self.names:
      if name not in emitted:
        raise ValueError(f"{argument or model + '.remat'} names {name!r}, which no {model} block "
                         "emits; "
                         f"expected names from {list(emitted)}")


def parse_remat(spec: str, argument: str = "remat") -> Remat:
  """Parses ``"none"``, ``"full"``, ``"dots"``, ``"save_attention"``, ``"offload_attention"``,
  ``"save_names(a, b)"``, ``"offload_names(a, b, to=pinned_host)"`` or ``"tokenwise(0.25)"``
  (errors name ``argument``)."""
  match = (re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", ALIASES.get(spec, spec))
           if isinstance(spec, str) else None)
  kind = match and match.group(1)
  args = [arg.strip() for arg in (match.group(2) or "").split(",") if arg.strip()] if match else []
  fail = lambda expected: ValueError(f"{argument} is {spec!r}; expected {expected}")
  if not match or kind not in (*FIXED_POLICIES, "save_names", "offload_names", "tokenwise"):
    raise fail(f"one of {SPEC_FORMS}")
  if kind in FIXED_POLICIES:
    if match.group(2) is not None:
      raise fail(f"{kind!r} without arguments")
    return Remat(kind)
  if kind == "tokenwise":
    try:
      (alpha,) = [fractions.Fraction(arg) for arg in args]
    except (ValueError, ZeroDivisionError):
      raise fail("tokenwise(alpha) with one number alpha in [0, 1]") from None
    if not 0 <= alpha <= 1:
      raise fail(f"tokenwise(alpha) with alpha in [0, 1], got alpha={float(alpha)}")
    return Remat(kind, alpha=alpha)
  options = dict(arg.replace(" ", "").split("=", 1) for arg in args if "=" in arg)
  names = tuple(arg for arg in args if "=" not in arg)
  allowed = {"to"} if kind == "offload_names" else set()
  if set(options) - allowed:
    raise fail(f"{kind}(name, ...) with {'no options but to=' if allowed else 'no options'}")
  if not names or any(not re.fullmatch(r"[\w@]+", name) for name in names):
    raise fail(f"{kind}(name, ...) with at least one activation name")
  to = options.get("to", OFFLOAD_DESTINATION)
  if to != OFFLOAD_DESTINATION:
    raise fail(f"offload_names(..., to={OFFLOAD_DESTINATION}) (the host memory kind)")
  return Remat(kind, names=names)


def remat_policy(spec: str) -> Callable[..., bool] | None:
  """The ``jax.checkpoint`` policy that ``spec`` names (None: do not checkpoint)."""
  return parse_remat(spec).policy()


def kept_token_count(alpha: fractions.Fraction, seq_len: int) -> int:
  """``ceil(alpha * seq_len)``, exactly: the positions ``tokenwise(alpha)`` keeps."""
  return math.ceil(alpha * seq_len)


def tag(x: jax.Array, name: str) -> jax.Array:
  """``checkpoint_name(x, name)``, suffixed ``@kept`` inside :func:`over_tokens`' kept part."""
  return checkpoint_name(x, name + _name_suffix.get())


def over_tokens(fn: Callable[..., Any], alpha: fractions.Fraction | None, *arrays: jax.Array
                ) -> Any:
  """``fn(*arrays)`` for a token-local ``fn`` of ``[batch, seq, ...]`` arrays (position ``t`` of
  the output depends only on position ``t`` of the inputs).

  With ``alpha`` (``tokenwise``), ``fn`` runs twice: on the first ``ceil(alpha * seq)``
  positions, with every :func:`tag` there suffixed ``@kept`` (the policy keeps those), and on the
  rest, with plain tags (recomputed); the outputs are concatenated along ``seq``.
  """
  if alpha is None:
    return fn(*arrays)
  seq_len = arrays[0].shape[1]
  kept = kept_token_count(alpha, seq_len)
  token = _name_suffix.set(KEPT_SUFFIX)
  try:
    head = fn(*(a[:, :kept] for a in arrays)) if kept else None
  finally:
    _name_suffix.reset(token)
  if kept == seq_len:
    return head
  tail = fn(*(a[:, kept:] for a in arrays))
  if head is None:
    return tail
  return jax.tree.map(lambda h, t: jax.numpy.concatenate([h, t], axis=1), head, tail)


DECODER_LADDER = ("none", "tokenwise(0.75)", "tokenwise(0.5)", "tokenwise(0.25)",
                  "save_attention", "offload_attention", "full")
""":func:`plan_remat`'s candidates for attention blocks, least recompute first: token-local work
recomputed for 0, 1/4, 1/2, 3/4 and all positions, then the attention output moved to the host,
then the attention forward rerun too. (``dots`` reruns the attention forward yet keeps every
projection, so at the lengths where memory binds it costs more compute than
``tokenwise(0.75)`` for about the same memory; it is not a candidate.)"""

LONG_CONV_LADDER = ("none", "save_names(mixer_input, long_conv_output)", "full")
""":func:`plan_remat`'s candidates for long-convolution blocks: the convolution's input and output
kept (the rerun skips the FFT convolution), then nothing kept."""


@dataclasses.dataclass(frozen=True)
class RematPlan:
  """What :func:`plan_remat` chose: ``choice``, and the compiled peak bytes per device of every
  candidate it compiled (in ladder order, the last one the choice)."""
  choice: str
  peak_bytes: dict[str, int]
  budget_bytes: int

  def table(self) -> str:
    """One line per compiled candidate: its peak in MiB and whether it fits."""
    return "\n".join(f"  {name:44s} {peak / 2**20:10.1f} MiB  "
                      f"{'fits' if peak <= self.budget_bytes else 'over budget'}"
                      for name, peak in self.peak_bytes.items())


def has_host_memory() -> bool:
  """Whether the default device has a ``pinned_host`` memory apart from its own (CPU: one
  memory, so offloading saves nothing there)."""
  device = jax.devices()[0]
  return device.platform != "cpu" and OFFLOAD_DESTINATION in {
      memory.kind for memory in device.addressable_memories()}


def plan_remat(peak_bytes: Callable[[str], int], budget_bytes: int,
               candidates: Sequence[str] = DECODER_LADDER) -> RematPlan:
  """The first of ``candidates`` (ordered least recompute first) whose step fits the budget.

  ``peak_bytes(spec)`` compiles the training step with ``remat=spec`` and returns its peak bytes
  per device (``effjax.benchmarking.memory_of(...).peak_bytes``: arguments + outputs + temp);
  candidates are compiled in order until one fits. Offloading candidates are skipped where
  :func:`has_host_memory` is false. Raises ``ValueError`` with every peak if none fits.
  """
  if budget_bytes <= 0:
    raise ValueError(f"budget_bytes is {budget_bytes}; expected a positive byte count")
  peaks: dict[str, int] = {}
  for spec in candidates:
    if parse_remat(spec).kind == "offload_names" and not has_host_memory():
      continue
    peaks[spec] = int(peak_bytes(spec))
    if peaks[spec] <= budget_bytes:
      return RematPlan(spec, peaks, budget_bytes)
  raise ValueError(f"no remat policy fits the budget of {budget_bytes / 2**20:.1f} MiB per "
                   "device:\n" + RematPlan("", peaks, budget_bytes).table() +
                   "\n(shorten the sequence, shrink the batch, use more devices or "
                   "model.reversible)")


def _subjaxprs(value: Any):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _subjaxprs(item)


def _eqns(jaxpr: jex_core.Jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs in its equations' parameters, depth first
  (a sub-jaxpr used twice is walked twice; a loop body once)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in (s for value in eqn.params.values() for s in _subjaxprs(value)):
      yield from _eqns(sub)


def count_attention_forwards(fn: Callable[..., Any], *args: Any) -> int:
  """Attention forward passes that one call ``fn(*args)`` runs (e.g. a training step's
  ``jax.grad``), counted in its jaxpr, recomputations included.

  Every flash / ring attention forward under differentiation ends in its tagged output
  (:func:`pallas_kernels.flash_attention.residuals.tag_residuals`), and a checkpointed block's
  recomputation replays that tag only when it reruns the forward; so this counts the tags.
  """
  return sum(eqn.primitive.name == "name" and eqn.params.get("name") == residuals.OUTPUT
             for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr))


def host_residual_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """Bytes that one call ``fn(*args)`` copies to host memory: the residuals an offloading
  policy (``"offload_attention"``) moves out of device memory, from the jaxpr's ``device_put``
  equations into ``jax.memory.Space.Host``."""
  return sum(var.aval.size * var.aval.dtype.itemsize
             for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr)
             if eqn.primitive.name == "device_put" for var in eqn.outvars
             if getattr(var.aval, "memory_space", None) == jax.memory.Space.Host)
