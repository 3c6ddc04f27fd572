"""Compute ops, one folder each (``api.py``, ``reference.py``, ``xla.py``); see DESIGN.md."""
