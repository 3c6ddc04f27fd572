"""FlashAttention for NVIDIA Hopper (sm_90) in Pallas Mosaic GPU, FlashAttention-3 style.

FlashAttention-3 (Shah et al. 2024) adds three ideas to FlashAttention-2; this kernel has the
first and, opt-in, the other two:

* **warp specialization**: each CTA runs three warpgroups; one producer issues TMA copies of the
  streamed blocks into a ring of ``stages`` shared-memory slots (a "loaded" barrier per slot and
  operand), two consumers (64 rows each, a 128-row tile per CTA) run the matmuls as asynchronous
  ``wgmma`` on the tensor cores and release each slot through a "consumed" barrier (two
  arrivals) for the producer to refill: loads of step ``t + stages`` overlap the math of step
  ``t``. The producer hands its registers to the consumers (``setmaxnreg`` 40 vs 232).
* ping-pong scheduling of the two consumers in the forward (one's softmax under the other's
  GEMMs): ``BlockSizes(ping_pong=True)``, opt-in.
* intra-warpgroup overlap in the forward (FA3 section 3.2): ``BlockSizes(overlap=True)``, opt-in,
  exclusive with ``ping_pong``. Step ``j`` of a consumer issues ``S_j = Q K_j^T``, then
  ``P_{j-1} V_{j-1}``, waits for ``S_j`` alone (``wgmma`` groups retire in order) and runs its
  softmax while the PV GEMM runs (prologue: block ``first``'s softmax; epilogue: the last PV; a
  tile without blocks skips all three). Register cost: ``S_j`` (float32), ``P_{j-1}`` (16-bit, a
  ``wgmma`` operand until the GEMM ends) and two float32 ``[64, dv]`` tiles (O and the fresh PV
  product: O is rescaled and added to as in the plain schedule, which keeps the two schedules
  bitwise equal) live at once per consumer, 64 rows: at ``block_kv = dv = 128``, ~224 of the 232
  registers a thread gets, so spills are possible. The producer refills each operand's slot as
  soon as that operand is released (K early, V late), so 2 stages suffice.

Softmax in base 2 with the scale folded: ``P = exp2(S * scale * log2(e) - m)``, one FMA before
the MUFU ``ex2``; the LSE is returned in natural log.

Three kernels, all deterministic (every output tile written by one CTA, no atomics):

* forward (:mod:`.forward`): a query tile streams the K/V blocks of its band; online softmax; O
  and the LSE.
* dq (:mod:`.backward`): a query tile streams the K/V blocks of its band, recomputing
  ``P = exp2(S - LSE)``, ``dP = dO V^T``, ``dS = P (dP - D)``, ``dQ += dS K``
  (``D = rowsum(dO O) - dLSE``, from XLA).
* dk/dv (:mod:`.backward`): a key tile (two consumers of 64 keys) streams Q, dO, LSE and D blocks
  of the queries that see it, for every query head of its GQA group, accumulating
  ``dV += P^T dO`` and ``dK += dS^T Q`` in registers: GQA needs no per-head partials.

Masks: ``causal`` (bottom-right aligned: query ``i`` sees key ``j <= i + kv_len - q_len``),
sliding ``window`` and the length tails, from the shared :class:`masks.MaskSpec`;
``softcap`` (``c * tanh(s / c)``) before the mask. A tile streams only the blocks its band
intersects (:meth:`~masks.MaskSpec.kv_range`, :meth:`~masks.MaskSpec.q_range`); each consumer
runs the blocks all its rows see whole (``kv_full_range``/``q_full_range``) without building a
mask. Both consumers run every step of their tile, so on the band's edges one may compute a
block fully masked for its rows. Garbage (NaN) in keys and values no query sees, and in queries
and output cotangents that see no key, is zeroed in XLA before the kernels (those positions are
contiguous for a band, and known statically): a zero probability times NaN in ``wgmma`` would
otherwise be NaN.

Segment ids (packed rows): each consumer reads its rows' ids and, per step, the streamed block's
ids (64-128 int32, L2-resident) from global memory straight into registers (no ring operand, no
barrier); every block is then masked (``q_id == kv_id``, with the band). Block skipping as the
Triton kernels: per tile, the ``[min, max]`` id interval is compared in XLA with the other side's
per-block intervals, and the tile streams only the blocks from the first to the last overlapping
one, intersected with its band (for sorted ids, exactly the blocks that share a segment). The
XLA zeroing also covers rows whose segment id the other side lacks (a padding segment): keys of
an id no query has, queries of an id no key has (found by sorting, O(n log n)). Not covered: NaN
in a key that shares an id with some query but lies outside every such query's band.

Head dims above 128 take the Triton backward of :mod:`..pallas_gpu` (the backward tiles would
overflow shared memory).

Shapes: any lengths (padded to 128 with zeros in XLA, only when needed), head dims up to 256
(padded to a multiple of 64: the 128-byte swizzle of 16-bit rows), GQA/MQA by index mapping,
bfloat16/float16 only (``wgmma`` operands); float32 raises ``NotImplementedError``.

Memory: O((q_len + kv_len) * head_dim) in HBM. Shared memory per CTA, forward: ``128 d`` (Q, then
O) plus ``2 stages block_kv d`` (K/V ring) 16-bit words: 160 KiB at d=128, 192 KiB at d=256 with
the defaults (H100/H200: 227 KiB); dq: ``128 (d + dv)`` plus the K/V ring of ``block_kv_dq``;
dk/dv: ``128 (d + dv)`` plus the Q/dO ring of ``block_q_dkv``.

Interpret mode (CPU): Pallas' Mosaic GPU interpreter (jax 0.10) accepts neither register nor
transposed ``wgmma`` operands and knows no register layouts, so there (only) those operands are
staged through shared memory and layout hints are skipped; the pipelines, barriers, TMA slices,
masks and arithmetic are the compiled kernels'.

Modules: :mod:`.wrapper` (the :func:`attention` that dispatch registers: checks, XLA glue,
``custom_vjp``), :mod:`.config` (:class:`BlockSizes`, the static call), :mod:`.pipeline` (the
ring, band loops and launch the kernels share), :mod:`.forward` and :mod:`.backward` (kernels).
"""

from pallas_kernels.flash_attention.mosaic_gpu.config import BlockSizes, default_block_sizes
from pallas_kernels.flash_attention.mosaic_gpu.wrapper import attention

__all__ = ["BlockSizes", "attention", "default_block_sizes"]
