"""The local update's speed against a bare PyTorch loop on the same model, and against this
machine's measured matmul peak.

    python bench/throughput.py [PRESET] [--threads N] [--steps S] [key=value ...]

On user 0's training examples of the preset (default: pyproject's defaults, tiny-t5 ``s``,
batch 16, 192/64 tokens): FLHF's SFT update (``train_sft``: length-grouped batches, bf16
autocast, AdamW, clipping) and a bare loop (the same batches, pre-collated, the same
optimizer and autocast, nothing else), in target tokens per second; the FLOPs of one
training step (``torch.utils.flop_counter``) over its time as a share of the matmul peak
(fp32 and bf16 2048x2048 matmuls). Writes ``bench/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from common import write_result

from flhf_core.config import RunConfig
from flhf_core.data import partitions
from flhf_core.data.corpus import load_corpus
from flhf_core.learning.algorithms.sft import SFTConfig, autocast, train_sft
from flhf_core.learning.batches import batches_of, encode
from flhf_core.learning.model import build_model, shipped_tokenizer
from flhf_core.runs.cli import merged_config, split_items


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of square matmuls at the current thread count."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def bare_loop(model, batches, config: SFTConfig) -> tuple[float, float]:
    """Seconds and target tokens of plain training steps over ``batches``."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    model.train()
    device = next(model.parameters()).device
    tokens = 0
    started = time.perf_counter()
    for batch in batches:
        with autocast(device, config.bf16):
            loss = model(**batch.model_inputs()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        tokens += int((batch.labels != -100).sum())
    return time.perf_counter() - started, tokens


def step_flops(model, batch, config: SFTConfig) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    with FlopCounterMode(display=False) as counter:
        with autocast(torch.device("cpu"), config.bf16):
            loss = model(**batch.model_inputs()).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="[PRESET] [key=value ...]")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure"
    )
    parser.add_argument(
        "--epochs", type=int, default=2, help="passes over the user's examples per measurement"
    )
    args = parser.parse_args()
    preset, overrides = split_items(args.items)
    config = RunConfig.from_mapping(merged_config(preset or "/dev/null", overrides))
    tokenizer = shipped_tokenizer()
    corpus = load_corpus(config)
    examples = partitions.user_partition(corpus, 0, 2, config).train
    sft = replace(SFTConfig.from_run_config(config, config.learning_rate, seed=0), epochs=args.epochs)
    encoded = encode(
        tokenizer, examples, config.max_source_tokens, config.max_target_tokens, config.prompt_code_start
    )
    results = {
        "config": {
            "tiny-t5-size": config.tiny_t5_size,
            "batch-size": sft.batch_size,
            "examples": len(examples),
        }
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        model = build_model(config, tokenizer)
        train_sft(model, tokenizer, examples[: sft.batch_size * 2], replace(sft, epochs=1))  # warm up
        flhf = train_sft(model, tokenizer, examples, sft, encoded=encoded)
        generator = torch.Generator().manual_seed(0)
        batches = [
            b
            for _ in range(args.epochs)
            for b in batches_of(encoded, sft.batch_size, generator, sft.group_by_length)
        ]
        bare_seconds, bare_tokens = bare_loop(build_model(config, tokenizer), batches, sft)
        flops = step_flops(model, batches[0], sft)
        step_seconds = bare_seconds / len(batches)
        peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
        achieved = flops / step_seconds / 1e9
        results[f"threads-{threads}"] = figures = {
            "flhf-tokens-per-second": flhf.tokens_per_second,
            "bare-tokens-per-second": bare_tokens / bare_seconds,
            "flhf-vs-bare": flhf.tokens_per_second / (bare_tokens / bare_seconds),
            "step-gflops": flops / 1e9,
            "achieved-gflop-per-second": achieved,
            "matmul-peak-fp32-gflop-per-second": peak32,
            "matmul-peak-bf16-gflop-per-second": peak16,
            "share-of-fp32-peak": achieved / peak32,
            "share-of-bf16-peak": achieved / peak16,
        }
        print(
            f"threads {threads}: FLHF {figures['flhf-tokens-per-second']:.0f} tok/s, bare loop "
            f"{figures['bare-tokens-per-second']:.0f} tok/s (ratio {figures['flhf-vs-bare']:.2f}); "
            f"{achieved:.1f} GFLOP/s achieved = {achieved / peak32:.0%} of the fp32 matmul peak "
            f"({peak32:.0f}), {achieved / peak16:.0%} of bf16 ({peak16:.0f})",
            flush=True,
        )
    write_result("throughput", results)


if __name__ == "__main__":
    main()
