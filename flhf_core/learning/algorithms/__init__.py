"""Local update rules, one file each. Feedback algorithms share ``rollout.py``."""

from flhf_core.learning.algorithms.best_of_n import train_best_of_n
from flhf_core.learning.algorithms.dpo import train_dpo
from flhf_core.learning.algorithms.ppo import train_ppo
from flhf_core.learning.algorithms.reinforce import train_reinforce

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
