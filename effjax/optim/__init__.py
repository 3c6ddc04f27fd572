"""Optimizers and sharded training: ZeRO stages 0-3 (:mod:`effjax.optim.zero`), FRUGAL and GaLore
(subspace optimizers, ``effjax/optim/frugal.py``), sparse fine-tuning (SpIEL, SNELL:
``effjax/optim/sparse.py``)."""

from effjax.optim.frugal import FrugalState, decoder_lm_matrices, frugal, galore
from effjax.optim.sparse import (CandidateStats, SM3Stats, SnellFactors, SnellState,
                                 SparseDeltaState, SparseFinetuneState, snell, snell_delta,
                                 sparse_finetune)
from effjax.optim.zero import (ZeroState, ZeroTrainer, choose_stage, model_state_bytes,
                               zero_trainer)

__all__ = ["FrugalState", "ZeroState", "ZeroTrainer", "choose_stage", "decoder_lm_matrices",
           "frugal", "galore", "model_state_bytes", "zero_trainer",
           # sparse fine-tuning (effjax/optim/sparse.py)
           "CandidateStats", "SM3Stats", "SnellFactors", "SnellState", "SparseDeltaState",
           "SparseFinetuneState", "snell", "snell_delta", "sparse_finetune"]
