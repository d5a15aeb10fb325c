"""FLHF from Python (a notebook, a script): run a preset, get its folder, summary and metrics.

    from flhf_core import run_flhf_simulation
    result = run_flhf_simulation("smoke", seed=1, feedback_algorithm="reinforce", sft_rounds=1)
    result.metrics.query("scope == 'server'")[["round", "rougeL", "reward"]]

:func:`run_flhf_simulation` drives the launcher of ``flhf run`` (a SuperLink of its own, the
real ServerApp and ClientApps in Flower's simulation engine, the run's real status): Flower
1.42's ``run_simulation`` is deprecated and hands the apps an empty run config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flhf_core.common import read_json
from flhf_core.config import ConfigError, RunConfig
from flhf_core.results.tracking import read_metrics

if TYPE_CHECKING:
    import pandas as pd


class RunFailed(RuntimeError):
    """The run did not complete; its folder (if any) says why."""


@dataclass
class RunResult:
    """A finished run: its folder, ``summary.json``, config and ``metrics.jsonl`` as a DataFrame."""

    run_dir: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    metrics: pd.DataFrame = field(repr=False)

    @classmethod
    def load(cls, run_dir: Path | str) -> RunResult:
        """Read a run folder (one this process ran, or any earlier one)."""
        import pandas as pd

        run_dir = Path(run_dir)
        rows = read_metrics(run_dir / "metrics.jsonl")
        return cls(
            run_dir,
            read_json(run_dir / "summary.json"),
            read_json(run_dir / "config.json"),
            pd.DataFrame(rows),
        )

    @property
    def server(self) -> pd.DataFrame:
        """The federation's row per round (held-out figures, the users' mean and worst reward...)."""
        return self.metrics[self.metrics["scope"] == "server"].reset_index(drop=True)

    @property
    def users(self) -> pd.DataFrame:
        """Each user's row per round."""
        return self.metrics[self.metrics["scope"] == "client"].reset_index(drop=True)


def overrides_to_items(overrides: dict[str, Any]) -> list[str]:
    """Python keyword arguments (``num_server_rounds=4``) as ``key=value`` run-config items."""
    items = []
    for name, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        items.append(f"{name.replace('_', '-')}={text}")
    return items


def run_flhf_simulation(
    preset: str | None = "smoke",
    *,
    users: int | None = None,
    cpus_per_user: int | None = None,
    stream: bool = True,
    **overrides: Any,
) -> RunResult:
    """Run ``preset`` (a name in ``configs/`` or a .toml path) with run-config ``overrides``
    (Python names: ``num_server_rounds=4``) in Flower's simulation engine, as ``flhf run``
    does; return its :class:`RunResult`. Raises :class:`RunFailed` if the run did not complete,
    and :class:`flhf_core.config.ConfigError` (naming the key) on a bad key or value."""
    from flhf_core.results.tracking import claim_run_dir
    from flhf_core.runs.cli import merged_config
    from flhf_core.runs.launcher import launch_simulation

    config = merged_config(preset, overrides_to_items(overrides))
    config["run-name"] = claim_run_dir(Path(config["results-dir"]), config["run-name"]).name
    code = launch_simulation(config, users, cpus_per_user, stream)
    run_dir = Path(config["results-dir"]) / config["run-name"]
    if code != 0:
        raise RunFailed(f"the FLHF run did not complete (exit {code}); see {run_dir}")
    return RunResult.load(run_dir)


def user_summaries(
    run_dirs: Sequence[Path | str], user: int, num_users: int, documents: int = 1
) -> pd.DataFrame:
    """What user ``user`` gets from each run's final model on its first held-out documents:
    the summary, and how the simulated user judges it (utility and its factors).

    Runs must share the data and users (the first run's config defines them).
    """
    import pandas as pd
    from transformers import AutoTokenizer

    from flhf_core.client.documents import corpus_documents
    from flhf_core.learning.generate import summarize
    from flhf_core.learning.model import load_pretrained

    config = RunConfig.from_saved(read_json(Path(run_dirs[0]) / "config.json"))
    docs = corpus_documents(config, user, num_users)
    examples = docs.report[:documents]
    rows = [
        {
            "model": "reference",
            "doc_id": e.doc_id,
            "summary": e.summary,
            **_judged(docs.profile, e.summary, e.summary),
        }
        for e in examples
    ]
    for run_dir in map(Path, run_dirs):
        model_dir = run_dir / "model"
        if not (model_dir / "config.json").is_file():
            raise ConfigError(
                f"{run_dir} has no global model (model/): personalization=local-head, or unfinished."
            )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = load_pretrained(model_dir)
        summaries = summarize(model, tokenizer, [e.source for e in examples], config)
        for example, summary in zip(examples, summaries, strict=True):
            rows.append(
                {
                    "model": run_dir.name,
                    "doc_id": example.doc_id,
                    "summary": summary,
                    **_judged(docs.profile, summary, example.summary),
                }
            )
    return pd.DataFrame(rows)


def _judged(profile: Any, summary: str, reference: str) -> dict[str, float]:
    from flhf_core.users.feedback import judge

    verdict = judge(profile, summary, reference)
    return {
        "utility": verdict.utility,
        "content": verdict.content,
        "length": verdict.length,
        "keywords": verdict.keywords,
        "words": verdict.words,
    }
