"""Local update rules, one file each. Feedback algorithms share ``rollout.py``."""

from .best_of_n import train_best_of_n
from .dpo import train_dpo
from .ppo import train_ppo
from .reinforce import train_reinforce

FEEDBACK_ALGORITHMS = {
    "best-of-n": train_best_of_n,
    "reinforce": train_reinforce,
    "ppo": train_ppo,
    "dpo": train_dpo,
}

# The version of each algorithm's objective: bumped when a change to its loss changes what a
# run computes, so that benchmarks set aside runs made under an older one (bench/quality.py
# runs them again) instead of comparing them with new ones. reinforce, ppo 2: the policy term
# averages over the informative samples' tokens (rollout.policy_token_mask).
OBJECTIVE_VERSIONS = {"sft": 1, "best-of-n": 1, "reinforce": 2, "ppo": 2, "dpo": 1}

__all__ = ["FEEDBACK_ALGORITHMS", "OBJECTIVE_VERSIONS"]
