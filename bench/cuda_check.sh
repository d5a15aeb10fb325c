#!/usr/bin/env bash
# FLHF on an offline CUDA machine (the device tool's 'cuda' image: python3 = /opt/torch/.venv/bin/python3,
# torch/transformers/tokenizers/peft/... already there). Run from the repo root, with the wheels of
# everything else in .whl/ (carry: [".whl"]; bench/cuda_wheels.txt lists them and how to fetch them).
# Writes at most 8 flat files to $OUT:
#   cuda_check.log       everything printed here
#   versions.txt         versions, where each module comes from, requirement problems, pip check
#   feedback.json        every feedback algorithm's feedback round on CUDA: feedback-smoke run in-process
#                        (flhf_core.runs.inprocess: the real ServerApp loop and ClientApp handlers), one per algorithm
#   smoke-summary.json   smoke-metrics.jsonl   flhf loopback smoke device=cuda --users 2
#   lora-summary.json    lora-metrics.jsonl    ... --secure personalization=lora (TLS + SuperNode auth)
#   logs.tar.gz          both runs' flower.log, flower-run.json, config.json and SuperLink/SuperNode logs
# Designed to end within ~7 minutes: each step's timeout is cut to what is left of BUDGET_S.
set -euo pipefail

OUT=${OUT:-/tmp/flhf-out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-480}
SITE=/tmp/site
export PIP_DISABLE_PIP_VERSION_CHECK=1
RESULTS=/tmp/flhf-results
T0=$(date +%s)

left() { echo $((T0 + BUDGET_S - $(date +%s))); }
# cap SECONDS: the smaller of SECONDS and what is left of the budget
cap() { local l; l=$(left); [ "$l" -ge 1 ] || l=1; if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi; }
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

main() {
  stamp "start $(date -u +%FT%TZ) on $(uname -m), $(nproc) cores"
  nvidia-smi -L || echo "nvidia-smi failed"
  PY=$(command -v python3)
  echo "python3: $PY ($("$PY" -V 2>&1))"

  stamp "install .whl/*.whl into $SITE ($(ls .whl/*.whl | wc -l) wheels)"
  rm -rf "$SITE" "$RESULTS"
  local t=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  echo "pip install took $(( $(date +%s) - t ))s"

  export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
  export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/hf-home MPLBACKEND=Agg
  # `flhf` (pyproject's console script flhf = flhf_core.runs.cli:main). The project is not installed into
  # $SITE on purpose: flhf_core finds pyproject.toml and configs/ beside itself, so it must come from $PWD.
  printf '#!/bin/sh\nexec "%s" -m flhf_core.runs.cli "$@"\n' "$PY" > "$SITE/bin/flhf"
  chmod +x "$SITE/bin/flhf"

  stamp "executables"
  local exe
  for exe in flhf flwr flower-superlink flower-supernode flower-superexec flwr-serverapp flwr-clientapp; do
    printf '%-18s %s\n' "$exe" "$(command -v "$exe" || echo MISSING)"
  done
  head -1 "$SITE/bin/flower-superlink"

  stamp "versions and requirements (-> versions.txt)"
  cat > /tmp/flhf_versions.py <<'EOF'
import importlib, importlib.metadata as md, re, sys, time
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn

SITE = sys.argv[1]
print("python", sys.version.split()[0], sys.executable)
print("\n# modules: version and origin")
for mod in ["torch", "transformers", "tokenizers", "huggingface_hub", "safetensors", "accelerate", "peft",
            "datasets", "pyarrow", "pandas", "numpy", "fsspec", "flwr", "grpc", "grpc_health", "google.protobuf",
            "cryptography", "sqlalchemy", "alembic", "fastapi", "starlette", "uvicorn", "pydantic", "typer",
            "click", "rich", "packaging", "requests", "httpx", "yaml", "rouge_score", "nltk", "aclsum",
            "tensorboard", "matplotlib", "tqdm"]:
    t = time.time()
    try:
        m = importlib.import_module(mod)
        v = getattr(m, "__version__", "?")
        where = "carried" if (getattr(m, "__file__", "") or "").startswith(SITE) else "image"
        print(f"{mod:16} {v!s:22} {where:8} {time.time() - t:5.1f}s  {getattr(m, '__file__', '')}")
    except Exception as e:  # report, go on
        print(f"{mod:16} IMPORT FAILED: {type(e).__name__}: {e}")

import torch
print("\ncuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")

print("\n# distributions found twice (the first one on sys.path wins)")
seen = {}
for d in md.distributions():
    name = cn(d.metadata["Name"] or "?")
    seen.setdefault(name, []).append((d.version, str(getattr(d, "_path", "?"))))
for name, found in sorted(seen.items()):
    if len(found) > 1:
        print(f"{name}: " + "  shadows  ".join(f"{v} ({p.rsplit('/', 1)[0]})" for v, p in found))

print("\n# run-time closure: requirement problems (uv and ray are not needed)")
env = {"extra": ""}
roots = {"flwr": (), "rouge-score": (), "aclsum": (), "datasets": (), "transformers": (), "tokenizers": (),
         "peft": (), "safetensors": (), "tensorboard": (), "matplotlib": (), "tqdm": (), "torch": (),
         "sqlalchemy": ("asyncio",), "uvicorn": ("standard",), "cryptography": ()}
todo, done, problems = list(roots.items()), set(), 0
while todo:
    name, extras = todo.pop()
    if (cn(name), extras) in done or cn(name) in ("uv", "ray"):
        continue
    done.add((cn(name), extras))
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        print(f"MISSING {name}"); problems += 1; continue
    for raw in dist.requires or []:
        r = Requirement(raw)
        if r.marker and not any(r.marker.evaluate({**env, "extra": e}) for e in ("",) + extras):
            continue
        if cn(r.name) in ("uv", "ray"):
            continue
        try:
            have = md.version(r.name)
        except md.PackageNotFoundError:
            print(f"MISSING {r.name} (required by {name} {dist.version}: {raw})"); problems += 1; continue
        if r.specifier and not r.specifier.contains(have, prereleases=True):
            print(f"CONFLICT {name} {dist.version} requires {r.name}{r.specifier}, found {have}"); problems += 1
        todo.append((r.name, tuple(sorted(r.extras))))
print(f"{len(done)} distributions checked, {problems} problems")
EOF
  { timeout "$(cap 90)" python3 /tmp/flhf_versions.py "$SITE" 2>&1 || echo "version check exited $?"
    echo; echo "# pip check (whole image; lines about packages FLHF does not use are noise)"
    timeout "$(cap 60)" python3 -m pip check 2>&1 || true
    echo; echo "# flwr --version"; flwr --version 2>&1 || true
  } | tee "$OUT/versions.txt"

  stamp "CUDA sanity check through flhf_core (smoke preset, one SFT step, one LoRA step, generate)"
  cat > /tmp/flhf_cuda_sanity.py <<'EOF'
import time
t0 = time.time()
import torch
from flhf_core import data, model
from flhf_core.learning.algorithms.sft import SFTConfig, train_sft
from flhf_core.config import PYPROJECT, RunConfig, load_preset, pyproject_defaults
from flhf_core.learning.generate import DecodingConfig, generate_summaries

print(f"imports {time.time() - t0:.1f}s; torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0)}")
values = dict(pyproject_defaults())
values.update(load_preset(PYPROJECT.parent / "configs" / "smoke.toml"))
values["device"] = "cuda"
config = RunConfig.from_mapping(values)
t = time.time()
corpus = data.load_corpus(config)
user = data.user_partition(corpus, 0, 2, config)
print(f"corpus {len(corpus.documents)} documents, user 0: {len(user.train)} train examples ({time.time() - t:.1f}s)")
tokenizer = model.shipped_tokenizer()
net = model.build_model(config, tokenizer).to(model.select_device(config.device))
print("model", type(net).__name__, sum(p.numel() for p in net.parameters()), "params on",
      next(net.parameters()).device)
sft = SFTConfig(epochs=1, batch_size=config.batch_size, learning_rate=config.learning_rate, bf16=config.bf16,
                max_source_tokens=config.max_source_tokens, max_target_tokens=config.max_target_tokens)
examples = user.train[: config.batch_size]
for label in ("sft", "sft again (warm)"):
    stats = train_sft(net, tokenizer, examples, sft)
    torch.cuda.synchronize()
    print(f"{label}: {stats.steps} step, loss {stats.loss:.3f}, {stats.seconds * 1000:.0f} ms")
net = model.add_lora(net, config.lora_rank, seed=0).to("cuda")
stats = train_sft(net, tokenizer, examples, sft)
print(f"lora sft: loss {stats.loss:.3f}, {stats.seconds * 1000:.0f} ms, "
      f"lora params {sum(p.numel() for n, p in net.named_parameters() if 'lora_' in n)}")
t = time.time()
out = generate_summaries(net, tokenizer, [e.source for e in examples[:4]], DecodingConfig.from_run_config(config),
                         config.max_source_tokens)
print(f"generate 4: {time.time() - t:.2f}s; first: {out[0][:100]!r}")
print(f"max memory allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB; total {time.time() - t0:.1f}s")
print("CUDA SANITY OK")
EOF
  local rc_sanity=0
  timeout -k 10 "$(cap 120)" python3 /tmp/flhf_cuda_sanity.py || rc_sanity=$?
  echo "sanity exit $rc_sanity"

  local rc_smoke=skipped rc_lora=skipped dt_smoke=- dt_lora=- s
  run_loopback() {  # NAME RUN-NAME [overrides...]; SIGINT on timeout so flhf stops its process groups
    local name=$1 run=$2 t l rc=0; shift 2
    l=$(cap 170)
    if [ "$l" -lt 45 ]; then echo "skip $name: only ${l}s of the budget left"; return 99; fi
    stamp "flhf loopback smoke device=cuda --users 2 $* (timeout ${l}s)"
    t=$(date +%s)
    timeout -s INT -k 25 "$l" flhf loopback smoke device=cuda --users 2 results-dir="$RESULTS" run-name="$run" "$@" \
      || rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - t ))s"
    eval "dt_$name=$(( $(date +%s) - t ))"
    return "$rc"
  }
  stamp "every feedback algorithm on CUDA: feedback-smoke in-process (1 SFT round, 1 feedback round)"
  local rc_feedback=0 algo
  for algo in best-of-n reinforce ppo dpo; do
    timeout -k 10 "$(cap 60)" python3 -m flhf_core.runs.inprocess feedback-smoke device=cuda feedback-algorithm="$algo" \
      results-dir="$RESULTS" run-name="feedback-$algo" --users 2 || { echo "$algo: exit $?"; rc_feedback=1; }
  done
  python3 - "$RESULTS" "$OUT/feedback.json" <<'EOF' || rc_feedback=1
import json, sys
from pathlib import Path
results, figures = Path(sys.argv[1]), {}
for algo in ("best-of-n", "reinforce", "ppo", "dpo"):
    run = results / f"feedback-{algo}"
    if not (run / "summary.json").is_file():
        figures[algo] = "no summary"
        continue
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    users = [r for r in rows if r["scope"] == "client" and r["round"] == 2 and "train-seconds" in r]
    figures[algo] = {
        "status": json.loads((run / "summary.json").read_text()).get("status"),
        "feedback-round-seconds": [r["seconds"] for r in rows if r["scope"] == "server" and r["round"] == 2],
        "train-seconds": [u["train-seconds"] for u in users],
        "train-kl": [u.get("train-kl") for u in users],
        "train-reward-gain": [u.get("train-reward-gain") for u in users],
    }
    print(algo, figures[algo])
json.dump(figures, open(sys.argv[2], "w"), indent=2)
sys.exit(0 if all(isinstance(f, dict) and f["status"] == "completed" for f in figures.values()) else 1)
EOF
  echo "feedback algorithms on CUDA: exit $rc_feedback"

  s=0; run_loopback smoke smoke || s=$?; rc_smoke=$s
  s=0; run_loopback lora smoke-lora --secure personalization=lora || s=$?; rc_lora=$s

  stamp "collect results"
  local run prefix
  for pair in smoke:smoke lora:smoke-lora; do
    prefix=${pair%%:*} run=${pair#*:}
    for f in summary.json metrics.jsonl; do
      if [ -f "$RESULTS/$run/$f" ]; then cp "$RESULTS/$run/$f" "$OUT/$prefix-$f"; else echo "no $run/$f"; fi
    done
  done
  if [ -d "$RESULTS" ]; then
    (cd "$RESULTS" && find . -maxdepth 2 \( -name '*.log' -o -name flower-run.json -o -name config.json \) -print0 \
      | tar -czf "$OUT/logs.tar.gz" --null -T -) || true
  fi
  for prefix in smoke lora; do
    [ -f "$OUT/$prefix-summary.json" ] && python3 - "$OUT/$prefix-summary.json" <<'EOF' || true
import json, sys
s = json.load(open(sys.argv[1]))
print(sys.argv[1].rsplit("/", 1)[1], {k: s[k] for k in list(s)[:12]})
EOF
  done
  ls -la "$OUT"
  stamp "done: sanity exit $rc_sanity; feedback exit $rc_feedback; smoke exit $rc_smoke (${dt_smoke}s); lora exit $rc_lora (${dt_lora}s)"
  [ "$rc_sanity" = 0 ] && [ "$rc_feedback" = 0 ] && [ "$rc_smoke" = 0 ] && [ "$rc_lora" = 0 ]
}

set -o pipefail
main 2>&1 | tee "$OUT/cuda_check.log"
