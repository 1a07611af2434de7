"""The algorithm, in plain torch and numpy: advantages, the clipped loss, the update loop."""
from rlds.algo.advantages import PerPromptStatTracker, compute_advantages
from rlds.algo.loss import clipped_policy_loss
from rlds.algo.ppo import lr_factor, make_optimizer, ppo_update

__all__ = ["PerPromptStatTracker", "clipped_policy_loss", "compute_advantages", "lr_factor",
           "make_optimizer", "ppo_update"]
