"""Pallas kernel bodies and their ``pallas_call`` wrappers, one folder per op.

This package never imports ``effjax``: kernels take arrays plus static options and return arrays;
effjax registers them as implementations of its ops. Every wrapper takes ``interpret: bool | None``;
``None`` follows :func:`pallas_kernels.interpret.interpret_mode` so tests can run every kernel on CPU.
"""
