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

__all__ = ["FEEDBACK_ALGORITHMS"]
