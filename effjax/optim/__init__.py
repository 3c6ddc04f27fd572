"""Optimizers and sharded training: ZeRO stages 0-3 (:mod:`effjax.optim.zero`), FRUGAL and GaLore
(subspace optimizers, ``effjax/optim/frugal.py``)."""

from effjax.optim.frugal import FrugalState, decoder_lm_matrices, frugal, galore
from effjax.optim.zero import (ZeroState, ZeroTrainer, choose_stage, model_state_bytes,
                               zero_trainer)

__all__ = ["FrugalState", "ZeroState", "ZeroTrainer", "choose_stage", "decoder_lm_matrices",
           "frugal", "galore", "model_state_bytes", "zero_trainer"]
