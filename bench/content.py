"""Does the summarizer say something? Each model against the extractive rules on ACLSum's
official test papers, over seeds, with bootstrap intervals of the paired differences.

    nohup python bench/content.py > content.log 2>&1 &     # every row, seeds 0-4 (resumable)
    python bench/content.py --rows default --seeds 0 1     # some of them
    python bench/content.py --report                       # the figures again, from the committed scores
    python bench/content.py --throughput                   # tokens/s of the local update vs a bare loop

A *row* is a federation (``flhf run`` with 2 users: pyproject's defaults, or a preset and
overrides, see :data:`ROWS`). Each seed of a row runs once (a finished one is kept), then its
final model summarizes every (test paper, aspect) pair of the official split (300 examples;
the server's own per-round evaluation uses ``heldout-max-examples`` of them) with the run's
decoding settings. The rules on the same examples: the first ``lead-words`` words of the
document, the abstract's first and last sentence, and per aspect the best of them (chosen on
these very examples: an upper bound on what picking a rule could do).

Paired differences: model minus rule on the same (seed, example); the 95% interval is a
bootstrap that resamples seeds and test papers (each with its three aspects; the same papers in every seed) independently,
so both kinds of variation are in it. A row beats a rule when the interval's lower end is
above 0. The default federation's wall time is the ``flhf run`` command's, whole (never time
beside other work: two torch processes on 2 cores slow each other 5-10x).

Writes ``bench/results/content.json`` (and prints the tables as Markdown), and each finished
seed's per-example scores to ``bench/results/content-seeds/ROW/seed-N.json``: the figures are
recomputed from those, so seeds run on different machines pool from a clean clone.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import PROJECT_DIR, machine, run_flhf, write_result
from transformers import AutoTokenizer

from flhf_core.common import atomic_write_json
from flhf_core.config import RunConfig
from flhf_core.data import partitions
from flhf_core.data.corpus import load_corpus
from flhf_core.data.extractor import train_split_extractor
from flhf_core.learning.generate import summarize
from flhf_core.learning.metrics import first_sentence, last_sentence, lead_words
from flhf_core.learning.model import load_pretrained, server_tokenizer
from flhf_core.results.statistics import paired_interval
from flhf_core.results.tracking import read_metrics
from flhf_core.users.rouge import rouge_pair

ASPECTS = ("challenge", "approach", "outcome")
# row -> [PRESET or "", key=value ...]: what `flhf run` is given (2 users, the seed added)
ROWS: dict[str, list[str]] = {
    # pyproject's defaults, the federation `flwr run .` runs: tiny-t5 reading the extracted
    # sentences, with copy attention
    "default": [""],
    # the tiny T5 before those levers: whole abstracts, no copying
    "tiny-before": ["", "extractor=none", "copy-attention=false"],
    # a lever alone on the tiny T5 before, or one more on the default
    "copy": ["", "extractor=none", "copy-attention=true"],
    "prompt-code": ["", "extractor=none", "copy-attention=false", "decoder-start=prompt-code"],
    "default-code": ["", "decoder-start=prompt-code"],
    "pretrained": ["pretrained", "extractor=none"],  # model = minilm-warm-start, whole abstracts
}
RULES = ("lead", "first-sentence", "last-sentence")  # the best of these per aspect is "the best rule"
# a stronger extractive rule, reported beside them: the first lead-words words of the sentence
# the highlight extractor (fitted on the official train papers) picks for the aspect
EXTRACTED = "extracted"
BOOTSTRAP = 4000
RESULTS = PROJECT_DIR / "results" / "content"
# each finished (row, seed)'s per-example scores, committed, so seeds run on different machines
# pool into one interval from a clean clone (results/ holds the runs themselves, and is not)
EVIDENCE = PROJECT_DIR / "bench" / "results" / "content-seeds"


# --------------------------------------------------------------------------
# One seed of one row: the run, then every test example scored
# --------------------------------------------------------------------------
def run_seed(row: str, seed: int) -> Path:
    """The run folder of ``row`` at ``seed``, run first if it is not finished."""
    folder = RESULTS / row
    run_dir = folder / f"seed-{seed}"
    if (run_dir / "bench.json").is_file():
        return run_dir
    folder.mkdir(parents=True, exist_ok=True)
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
        # finished, but the bench stopped before scoring it: scored now; the wall time is the
        # run's own (the ServerApp's, without the launcher's few seconds)
        atomic_write_json(run_dir / "scores.json", score_test_examples(run_dir))
        wall = json.loads(summary.read_text())["seconds"]
        atomic_write_json(run_dir / "bench.json", {"wall-seconds": wall, "wall-from": "summary.json"})
        return run_dir
    if run_dir.exists():  # killed or failed: kept aside, the seed runs again from the start
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}"))
    preset, *overrides = ROWS[row]
    if not preset:
        preset = str(folder / "pyproject-defaults.toml")
        Path(preset).write_text("# nothing: pyproject's defaults\n")
    started = time.perf_counter()
    run_flhf("run", [preset, *overrides, f"seed={seed}", "--users=2", "resume=false"], folder, run_dir.name)
    wall = time.perf_counter() - started
    atomic_write_json(run_dir / "scores.json", score_test_examples(run_dir))
    atomic_write_json(run_dir / "bench.json", {"wall-seconds": wall})
    return run_dir


def score_test_examples(run_dir: Path) -> dict:
    """ROUGE-L (0-100) of the run's final model and of each rule on every official test example."""
    config = RunConfig.from_saved(json.loads((run_dir / "config.json").read_text()))
    corpus = load_corpus(config)
    examples = partitions.heldout_examples(corpus, config.replace(**{"heldout-max-examples": 0}))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")  # the vocabulary the run's weights use
    model = load_pretrained(run_dir / "model")
    predictions = summarize(model, tokenizer, [e.source for e in examples], config)
    abstracts = partitions.abstracts(corpus)
    rules = {
        "lead": lambda e: lead_words(corpus.by_id[e.doc_id].text, config.lead_words),
        "first-sentence": lambda e: first_sentence(abstracts[e.doc_id]),
        "last-sentence": lambda e: last_sentence(abstracts[e.doc_id]),
    }
    rows = []
    for example, prediction in zip(examples, predictions, strict=True):
        row = {"doc": example.doc_id, "aspect": example.aspect, "prediction": prediction}
        row["model"] = 100 * rouge_pair(prediction, example.summary)["rougeL"]
        for name, rule in rules.items():
            row[name] = 100 * rouge_pair(rule(example), example.summary)["rougeL"]
        rows.append(row)
    return {
        "heldout-by": partitions.heldout_by(corpus, config),
        "lead-words": config.lead_words,
        "examples": rows,
    }


# --------------------------------------------------------------------------
# Figures: pure functions of the scores
# --------------------------------------------------------------------------
def best_rule_per_aspect(examples: list[dict]) -> dict[str, str]:
    """For each aspect, the rule with the highest mean ROUGE-L on ``examples``."""
    return {
        aspect: max(RULES, key=lambda r: np.mean([e[r] for e in examples if e["aspect"] == aspect]))
        for aspect in sorted({e["aspect"] for e in examples})
    }


def row_figures(per_seed: dict[int, list[dict]], seed: int = 0) -> dict:
    """A row's ROUGE-L overall and by aspect, the rules', and model-minus-rule differences."""
    seeds = sorted(per_seed)
    keys = [(e["doc"], e["aspect"]) for e in per_seed[seeds[0]]]
    for s in seeds:  # every seed scored the same examples, in the same order
        assert [(e["doc"], e["aspect"]) for e in per_seed[s]] == keys, f"seed {s} scored other examples"
    first = per_seed[seeds[0]]
    best = best_rule_per_aspect(first)
    names = (*RULES, *([EXTRACTED] if EXTRACTED in first[0] else []), "model")
    score = {name: np.array([[e[name] for e in per_seed[s]] for s in seeds]) for name in names}
    score["best-rule-per-aspect"] = np.array([[e[best[e["aspect"]]] for e in per_seed[s]] for s in seeds])
    rng = np.random.default_rng(seed)
    figures: dict = {"seeds": seeds, "examples": len(keys), "best-rule": best}
    for subset in ("all", *ASPECTS):
        mask = np.array([subset == "all" or a == subset for _, a in keys])
        if not mask.any():
            continue
        entry: dict = {name: float(values[:, mask].mean()) for name, values in score.items()}
        entry["model-per-seed"] = [float(v) for v in score["model"][:, mask].mean(axis=1)]
        for rule in (*(n for n in names if n != "model"), "best-rule-per-aspect"):
            papers = [doc for (doc, _), kept in zip(keys, mask, strict=True) if kept]
            interval = paired_interval(score["model"][:, mask] - score[rule][:, mask], papers, rng, BOOTSTRAP)
            mean, low, high = interval.mean, interval.low, interval.high
            entry[f"minus-{rule}"] = {"mean": mean, "low": low, "high": high}
        figures[subset] = entry
    return figures


def validation_rouge(run_dir: Path) -> float:
    """The users' mean ROUGE-L on their validation documents in the last round: what a lever is
    chosen on (never the test papers)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    last = max(r["round"] for r in rows)
    return float(
        np.mean(
            [r["rougeL"] for r in rows if r["scope"] == "client" and r["round"] == last and "rougeL" in r]
        )
    )


@functools.cache
def extracted_rule() -> dict[tuple[str, str], float]:
    """ROUGE-L (0-100) of the extracted-sentence rule on every official test (paper, aspect)."""
    config = RunConfig()
    corpus = load_corpus(config)
    extractor = train_split_extractor(corpus)
    scores = {}
    for e in partitions.heldout_examples(corpus, config.replace(**{"heldout-max-examples": 0})):
        sentence = extractor.extract(corpus.by_id[e.doc_id], e.aspect, 1)
        scores[e.doc_id, e.aspect] = (
            100 * rouge_pair(lead_words(sentence, config.lead_words), e.summary)["rougeL"]
        )
    return scores


def evidence(row: str, seed: int) -> dict | None:
    """The committed scores of ``row`` at ``seed`` (written from its run folder when this checkout
    holds a finished run and no evidence yet), or None."""
    path = EVIDENCE / row / f"seed-{seed}.json"
    run_dir = RESULTS / row / f"seed-{seed}"
    if not path.is_file() and (run_dir / "bench.json").is_file():
        atomic_write_json(
            path,
            {
                "row": row,
                "seed": seed,
                "items": ROWS[row],
                "machine": machine(),  # wall times compare only on one machine
                "wall-seconds": json.loads((run_dir / "bench.json").read_text())["wall-seconds"],
                "val-rougeL": validation_rouge(run_dir),
                **json.loads((run_dir / "scores.json").read_text()),
            },
        )
    return json.loads(path.read_text()) if path.is_file() else None


def collect(rows: list[str], seeds: list[int]) -> dict:
    """Every finished (row, seed)'s scores, validation ROUGE-L and wall time, by row."""
    collected: dict = {}
    for row in rows:
        per_seed, walls, validation = {}, [], {}
        for seed in seeds:
            found = evidence(row, seed)
            if found is not None and found["items"] != ROWS[row]:
                raise ValueError(f"{row} seed {seed} ran with {found['items']}, the row is now {ROWS[row]}")
            if found is not None:
                per_seed[seed] = found["examples"]
                for e in per_seed[seed]:  # the same for every row: scored here, not per run
                    e[EXTRACTED] = extracted_rule()[e["doc"], e["aspect"]]
                walls.append(found["wall-seconds"])
                validation[seed] = found["val-rougeL"]
        if per_seed:
            figures = row_figures(per_seed)
            collected[row] = {**figures, "val-rougeL": validation, "wall-seconds": walls, "items": ROWS[row]}
    return collected


# what each lever is judged against: the tiny T5 before the levers, or the default it adds to
LEVER_REFERENCE = {
    "default": "tiny-before",
    "copy": "tiny-before",
    "prompt-code": "tiny-before",
    "default-code": "default",
}


def lever_choice(collected: dict) -> dict:
    """Each lever's row against its reference (:data:`LEVER_REFERENCE`) on the users' validation
    ROUGE-L, seed by seed: a lever is kept only when it is ahead on every seed both ran."""
    choice = {}
    for row, reference in LEVER_REFERENCE.items():
        if row not in collected or reference not in collected:
            continue
        base = collected[reference]["val-rougeL"]
        figures = collected[row]
        seeds = sorted(set(figures["val-rougeL"]) & set(base))
        differences = [figures["val-rougeL"][s] - base[s] for s in seeds]
        choice[row] = {
            "reference": reference,
            "seeds": seeds,
            "val-difference": differences,
            "ahead-on-every-seed": all(d > 0 for d in differences) and bool(seeds),
        }
    return choice


def markdown(collected: dict) -> str:
    lines = [
        "| row | seeds | ROUGE-L | first k words | best rule per aspect | − first k words (95% CI) "
        "| − best rule per aspect (95% CI) | challenge | approach | outcome | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, f in collected.items():
        a = f["all"]

        def interval(d: dict) -> str:
            return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"

        aspects = [
            f"{f[x]['model']:.1f} vs {f[x]['best-rule-per-aspect']:.1f} ({f['best-rule'][x]})"
            if x in f
            else "–"
            for x in ASPECTS
        ]
        lines.append(
            f"| {row} | {len(f['seeds'])} | {a['model']:.2f} | {a['lead']:.2f} | {a['best-rule-per-aspect']:.2f} "
            f"| {interval(a['minus-lead'])} | {interval(a['minus-best-rule-per-aspect'])} | "
            + " | ".join(aspects)
            + f" | {np.mean(f['wall-seconds']):.0f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Speed of the local update against a bare PyTorch loop, per model
# --------------------------------------------------------------------------
def throughput(row: str, steps: int) -> dict:
    """Target tokens/s of FLHF's SFT update and of a bare loop on the same batches (user 0 of 2)."""
    import torch
    from throughput import bare_loop

    from flhf_core.learning.algorithms.sft import SFTConfig, train_sft
    from flhf_core.learning.batches import batches_of, encode
    from flhf_core.learning.model import build_model
    from flhf_core.runs.cli import merged_config

    preset, *overrides = ROWS[row]
    config = RunConfig.from_mapping(merged_config(preset or "/dev/null", overrides))
    corpus = load_corpus(config)
    tokenizer, _ = server_tokenizer(config, corpus)
    examples = partitions.user_partition(corpus, 0, 2, config).train
    sft = replace(SFTConfig.from_run_config(config, config.learning_rate, seed=0), epochs=1)
    examples = examples[: steps * sft.batch_size]
    encoded = encode(
        tokenizer, examples, config.max_source_tokens, config.max_target_tokens, config.prompt_code_start
    )
    model = build_model(config, tokenizer)
    train_sft(model, tokenizer, examples[: sft.batch_size], sft)  # warm up
    flhf = train_sft(model, tokenizer, examples, sft, encoded=encoded)
    batches = list(batches_of(encoded, sft.batch_size, torch.Generator().manual_seed(0), sft.group_by_length))
    seconds, tokens = bare_loop(build_model(config, tokenizer), batches, sft)
    bare = tokens / seconds
    print(f"{row}: FLHF {flhf.tokens_per_second:.0f} tok/s, bare loop {bare:.0f} tok/s", flush=True)
    return {
        "flhf-tokens-per-second": flhf.tokens_per_second,
        "bare-tokens-per-second": bare,
        "flhf-vs-bare": flhf.tokens_per_second / bare,
        "steps": len(batches),
        "torch-threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--report", action="store_true", help="only recompute the figures of finished runs")
    parser.add_argument("--throughput", action="store_true", help="measure each row's local update speed")
    parser.add_argument("--steps", type=int, default=12, help="--throughput: training steps per measurement")
    args = parser.parse_args()
    output = PROJECT_DIR / "bench" / "results" / "content.json"
    previous = json.loads(output.read_text()) if output.is_file() else {}
    if args.throughput:
        speeds = {row: throughput(row, args.steps) for row in args.rows}
        write_result(
            "content", {**_figures_of(previous), "throughput": {**previous.get("throughput", {}), **speeds}}
        )
        return
    if not args.report:
        for row in args.rows:
            for seed in args.seeds:
                started = time.perf_counter()
                run_seed(row, seed)
                print(f"{row} seed {seed}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    collected = collect(list(ROWS), args.seeds)
    print(markdown(collected))
    levers = lever_choice(collected)
    for row, c in levers.items():
        print(
            f"{row} - {c['reference']} on validation ROUGE-L per seed: {' '.join(f'{d:+.2f}' for d in c['val-difference'])}"
            f" ({'ahead on every seed' if c['ahead-on-every-seed'] else 'not ahead on every seed'})"
        )
    # rows whose runs this checkout does not hold (another machine ran them) keep their figures;
    # a row run here again replaces its figures with those of the seeds found here
    rows = {**previous.get("rows", {}), **collected}
    levers = {**previous.get("levers", {}), **levers}
    write_result("content", {"rows": rows, "levers": levers, "throughput": previous.get("throughput", {})})


def _figures_of(previous: dict) -> dict:
    return {"rows": previous.get("rows", {}), "levers": previous.get("levers", {})}


if __name__ == "__main__":
    main()
