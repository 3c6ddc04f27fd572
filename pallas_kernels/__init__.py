"""Pallas kernel bodies and their ``pallas_call`` wrappers, one folder per op.

This package never imports ``effjax``: kernels take arrays plus static options and return arrays;
effjax registers them as implementations of its ops. A kernel module is named after its dispatch
key (``pallas_gpu``, ``pallas_tpu``, ``mosaic_gpu``), and every public wrapper takes the keyword
pair ``block_sizes: BlockSizes | None`` (its module's dataclass; None: its heuristic) and
``interpret: bool | None`` (None follows :func:`pallas_kernels.interpret.interpret_mode`, so tests
can run every kernel on CPU). Padding and rounding helpers live in :mod:`pallas_kernels.shapes`.
"""
