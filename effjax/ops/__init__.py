"""Compute ops, one folder each (``api.py``, ``reference.py``, ``xla.py``, Pallas adapters); see
DESIGN.md: ``attention`` (``flash_attention``), ``long_conv`` and ``kv_decode`` (decode attention
over the quantized KV caches)."""
