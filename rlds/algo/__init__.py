"""The algorithm, in plain torch and numpy: advantages, objectives, losses, schedules, L_pre."""
from rlds.algo.advantages import ADVANTAGES, PerPromptStatTracker, compute_advantages
from rlds.algo.loss import clipped_policy_loss
from rlds.algo.objectives import OBJECTIVES
from rlds.algo.ppo import make_optimizer, ppo_update
from rlds.algo.schedules import LR_SCHEDULES, lr_factor

__all__ = ["ADVANTAGES", "LR_SCHEDULES", "OBJECTIVES", "PerPromptStatTracker", "clipped_policy_loss",
           "compute_advantages", "lr_factor", "make_optimizer", "ppo_update"]
