"""Optimizers and sharded training: ZeRO stages 0-3 (:mod:`effjax.optim.zero`)."""

from effjax.optim.zero import (ZeroState, ZeroTrainer, choose_stage, model_state_bytes,
                               zero_trainer)

__all__ = ["ZeroState", "ZeroTrainer", "choose_stage", "model_state_bytes", "zero_trainer"]
