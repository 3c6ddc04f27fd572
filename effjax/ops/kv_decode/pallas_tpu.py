"""The ``"pallas_tpu"`` implementations of the decode ops: the Mosaic TPU kernels of
``pallas_kernels.kv_decode.{kivi,vidkv,xquant}.pallas_tpu`` over a cache's quantized slots,
combined with its full-precision tail (:mod:`effjax.ops.kv_decode.partials`). Off a TPU, unless
interpreting (``pallas_kernels.interpret``), they raise NotImplementedError so dispatch moves on.
"""

from effjax.ops.kv_decode import partials
from pallas_kernels.kv_decode.kivi import pallas_tpu as kivi_kernel
from pallas_kernels.kv_decode.vidkv import pallas_tpu as vidkv_kernel
from pallas_kernels.kv_decode.xquant import pallas_tpu as xquant_kernel

kivi, vidkv, xquant = partials.bind(kivi_kernel.decode_partials, vidkv_kernel.decode_partials,
                                    xquant_kernel.decode_partials)
