"""Differentially private training (issue 19, in progress): privacy accounting so far.

:mod:`effjax.privacy.accounting`: epsilon spent by DP-SGD with Poisson sampling, the noise
multiplier for a target epsilon, and the steps a budget allows, through ``dp-accounting``'s RDP
and PLD accountants.
"""

from effjax.privacy.accounting import (ACCOUNTANTS, dp_sgd_event, epsilon_spent,
                                       noise_multiplier_for, steps_within_budget)

__all__ = ["ACCOUNTANTS", "dp_sgd_event", "epsilon_spent", "noise_multiplier_for",
           "steps_within_budget"]
