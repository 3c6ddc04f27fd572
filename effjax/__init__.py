"""effjax: memory-efficient building blocks for training and serving large models in JAX.

Public entry points are re-exported here as they land; see README.md for the API at a glance.
"""

from effjax import dispatch

__all__ = ["dispatch"]
__version__ = "0.1.0"
