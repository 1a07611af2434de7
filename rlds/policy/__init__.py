"""The policy: a text-to-image diffusion model and its stochastic DDIM step with log-probability."""
from rlds.policy.builder import Architecture, Policy, build_policy, build_tiny_policy
from rlds.policy.ddim import ddim_step_with_logprob
from rlds.policy.pipeline import (flatten_trainable, load_flat_trainable, load_policy, save_policy,
                                  trainable_parameters, write_flat_trainable)
from rlds.policy.sampling import Trajectory, sample_trajectories, step_log_prob

__all__ = ["Architecture", "Policy", "Trajectory", "build_policy", "build_tiny_policy", "ddim_step_with_logprob",
           "flatten_trainable", "load_flat_trainable", "load_policy", "sample_trajectories", "save_policy",
           "step_log_prob", "trainable_parameters", "write_flat_trainable"]
