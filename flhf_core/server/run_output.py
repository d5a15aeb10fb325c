"""What a federation leaves behind once a round is complete: its rows (the server's and one
per user) and ``judgements.json``; at the end, ``summary.json``, the final model and the plots.
The writing half of :class:`~flhf_core.server.federation.Federation`, which keeps the rest (round
0's row, ``splits.json``, a failed round's user rows, the checkpoints) beside its loop.

Rows are appended as each round's evaluation comes in; everything else is written
atomically, and a failed run still gets its summary (marked failed) and the last good
global model: the rounds before a failure are never lost.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import MessageType

from flhf_core.common import atomic_write_json, save_folder_atomically
from flhf_core.data import partitions
from flhf_core.results.checkpoint import PendingRound
from flhf_core.results.rounds import RoundReport
from flhf_core.results.tracking import Tracker, plot_metrics, read_metrics
from flhf_core.server.reporting import eval_columns, record_users, run_summary, user_spread
from flhf_core.server.state import NO_GLOBAL_MODEL, PLOTTED, ServerState
from flhf_core.users.profiles import build_profile


class RunOutput:
    """Writes a :class:`~flhf_core.server.federation.Federation`'s results from the state it keeps
    (declared below); it changes none of that state."""

    state: ServerState
    tracker: Tracker
    initial: dict[str, float]
    num_users: int
    own_data_users: set[int]
    rounds_done: int
    resumed_after: list[int]

    def write_round(
        self, pending: PendingRound, evaluation: tuple[RoundReport, dict | None] | None
    ) -> dict[str, float]:
        """Write a round's rows, its server row and one row per user, with its model's evaluation
        (and ``judgements.json``); returns the server row."""
        report, averaged = (
            evaluation
            if evaluation is not None
            else (RoundReport(pending.server_round, MessageType.EVALUATE), None)
        )
        record_users(self.tracker, pending.server_round, pending.phase, pending.train, report)
        row = dict(pending.row)
        if evaluation is not None:
            row.update({f"client-{k}": v for k, v in eval_columns(averaged or {}).items()})
            row.update(user_spread(report.user_metrics))
            row["eval-failures"] = report.failures
        self.tracker.log(pending.server_round, pending.phase, "server", None, row)
        if evaluation is not None and report.user_lists:
            self.write_judgements(pending.server_round, report)
        return row

    def write_judgements(self, server_round: int, report: RoundReport) -> None:
        """``judgements.json``: the latest evaluated model's per-document figures, per user.

        Each user's held-out documents (``doc-ids``, in the order of its lists; null for a
        user with its own data file) with the true utility and content of the summary the
        user's model wrote: enough to compare two runs document by document.
        """
        state = self.state
        users = {}
        for user, values in sorted(report.user_lists.items()):
            doc_ids = None
            if user not in self.own_data_users and 0 <= user < max(self.num_users, 1):
                profile = build_profile(
                    user, state.config.user_profiles, state.corpus.aspects, state.config.seed
                )
                doc_ids = [e.doc_id for e in partitions.report_examples(state.corpus, state.config, profile)]
            users[str(user)] = {"doc-ids": doc_ids, **values}
        atomic_write_json(self.tracker.run_dir / "judgements.json", {"round": server_round, "users": users})

    def write_results(self, error: BaseException | None = None) -> None:
        """summary.json, the final model (where there is one) and plots; on failure, marked failed."""
        run_dir, state = self.tracker.run_dir, self.state

        def save(folder: Path) -> None:
            state.model.save_pretrained(folder)
            state.tokenizer.save_pretrained(folder)

        if state.config.has_global_model:
            save_folder_atomically(run_dir / "model", save)  # on failure: the last good global model
        rows = read_metrics(self.tracker.metrics_path)
        summary = run_summary(rows, state.config.to_mapping(), state.baselines, self.initial)
        summary["status"] = "completed" if error is None else "failed"
        if self.resumed_after:
            summary["resumed-after-rounds"] = self.resumed_after
        if error is not None:
            summary["error"] = f"{type(error).__name__}: {error}"
            # the round that was running (a failure after the last round is the last round's)
            summary["failed-in-round"] = min(self.rounds_done + 1, state.config.num_server_rounds)
        if state.config.has_global_model:
            summary["model-dir"] = str(run_dir / "model")
        else:
            summary["global-model"] = NO_GLOBAL_MODEL
        self.tracker.write_summary(summary)
        lead = f"baseline-lead{state.config.lead_words}"
        baselines = {
            metric: {
                f"first {state.config.lead_words} words": state.baselines[f"{lead}-{metric}"],
                "last sentence of the abstract": state.baselines[f"baseline-last-sentence-{metric}"],
            }
            for metric in ("rougeL", "rouge1")
        }
        plot_metrics(rows, run_dir / "plots", PLOTTED, baselines)
        self.tracker.finish(summary["status"])
