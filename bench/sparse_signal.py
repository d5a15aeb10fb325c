"""How far a feedback round moves the policy in steps that carry no signal (Adam's arithmetic).

    python bench/sparse_signal.py [preset] [key=value ...]     (default: reinforce)

At a budget of B judgements a round, the user rates one document's samples at a few of the
round's steps (:class:`flhf_core.learning.algorithms.scorer.Scorer`'s schedule); the other steps'
policy term is empty, and only the KL penalty acts. The feedback algorithms build a fresh
AdamW each round (:func:`flhf_core.learning.algorithms.rollout.make_optimizer`), so the moment
estimates of a rated step carry into the steps after it. This takes the product's schedule
for each budget and the product's optimizer with the preset's settings, and follows one parameter whose only
gradient is a constant one in the rated steps (the KL's pull ignored: its gradient is zero
at the round's first step and small after), one optimizer step per PPO epoch:

    moved in steps with a signal / without one, in units of the learning rate, and the share
    of the round's movement made without a signal.

Only the user's own ratings count as a signal here; a learned reward model the gate trusts
adds signal to the other steps. No model, no data: seconds on any machine. It shows what the optimizer *can* do, not what it
did to the summarizer; that the replay hurts is BENCHMARKS' hypothesis for the 8-judgement rows.
Writes ``bench/results/sparse_signal.json``.
"""

from __future__ import annotations

import sys

import torch
from common import write_result

from flhf_core.config import RunConfig
from flhf_core.learning.algorithms.rollout import FeedbackConfig, make_optimizer
from flhf_core.learning.algorithms.scorer import Scorer
from flhf_core.runs.cli import merged_config, split_items
from flhf_core.users.feedback import UserProfile

BUDGETS = (8, 32, 0)  # judgements per user and round (0: unlimited)


def rated_steps(budget: int, steps: int, group_size: int) -> list[int]:
    """The steps (1-based) at which a user with ``budget`` judgements rates a document's samples,
    by the product's schedule; every step when the budget is unlimited."""
    scorer = Scorer(UserProfile(user_id=0, aspect="outcome"), budget, steps, group_size)
    rated = []
    for step in range(1, steps + 1):
        allowance = scorer._allowance(group_size)
        if allowance != 0:  # -1: unlimited
            rated.append(step)
            scorer.used += group_size if allowance > 0 else 0
    return rated


def movement(rated: list[int], feedback: FeedbackConfig) -> dict[str, float]:
    """One parameter under the product's optimizer (:func:`make_optimizer`): a constant gradient
    in the rated steps, none in the others; what each kind of step moved it."""
    holder = torch.nn.Linear(1, 1, bias=False)  # a module with one parameter, as make_optimizer takes
    parameter = holder.weight
    with torch.no_grad():
        parameter.zero_()
    optimizer = make_optimizer(holder, feedback)
    steps, epochs, learning_rate = feedback.steps, feedback.ppo_epochs, feedback.learning_rate
    moved = {"with-signal": 0.0, "without-signal": 0.0}
    for step in range(1, steps + 1):
        for _ in range(epochs):
            before = parameter.item()
            parameter.grad = torch.full_like(parameter, -1e-3 if step in rated else 0.0)
            optimizer.step()
            moved["with-signal" if step in rated else "without-signal"] += parameter.item() - before
    total = moved["with-signal"] + moved["without-signal"]
    return {
        "with-signal-lr": moved["with-signal"] / learning_rate,
        "without-signal-lr": moved["without-signal"] / learning_rate,
        "share-without-signal": moved["without-signal"] / total,
    }


def main() -> None:
    preset, overrides = split_items(sys.argv[1:] or ["reinforce"])
    config = RunConfig.from_mapping(merged_config(preset, overrides))
    figures = {}
    for budget in BUDGETS:
        rated = rated_steps(budget, config.feedback_steps, config.samples_per_prompt)
        moved = movement(rated, FeedbackConfig.from_run_config(config))
        figures[f"budget-{budget}"] = {"rated-steps": rated, **moved}
        print(
            f"budget {budget or 'unlimited':>9}: rated at steps {rated}; moved {moved['with-signal-lr']:.1f} lr "
            f"with a signal, {moved['without-signal-lr']:.1f} lr without ({moved['share-without-signal']:.0%})"
        )
    write_result("sparse_signal", {"preset": preset, "overrides": overrides, **figures})


if __name__ == "__main__":
    main()
