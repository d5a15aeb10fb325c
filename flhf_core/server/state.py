"""The server's side of a run: its data, tokenizer and global model, and their evaluation.

Everything that can fail on bad input (config, data, model, tokenizer) is done in
:func:`prepare`, before the run directory is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flhf_core.config import ConfigError, RunConfig
from flhf_core.data import partitions
from flhf_core.data.corpus import Corpus, Example, load_corpus
from flhf_core.learning import warm_start
from flhf_core.learning.batches import Batch, check_distinct_codes, make_batches
from flhf_core.learning.metrics import baseline_scores, evaluate_model
from flhf_core.learning.model import (
    CLIENT_ONLY_PERSONALIZATIONS,
    TokenizerSpec,
    build_model,
    canonical_parameters,
    load_pretrained,
    personal_parameter_names,
    select_device,
    server_tokenizer,
    tokenizer_fingerprint,
    with_personal_parameters,
)
from flhf_core.protocol import LEARNING_RATE, PHASE, RUN_NAME, TOKENIZER_JSON, TOKENIZER_SHA256
from flhf_core.server.aggregation import REWARD_SHORTFALL
from flhf_core.server.reward_models import RewardModelExchange
from flhf_core.server.reward_pool import RewardModelPool
from flhf_core.server.strategy import FeedbackFedAvg

# What every run plots (plots/<key>.png): quality, the users' reward and its factors, time
PLOTTED = (
    "rougeL",
    "rouge1",
    "loss",
    "perplexity",
    "train-loss",
    "reward",
    "reward-worst",
    "win-rate",
    "reward-content",
    "reward-length",
    "reward-keywords",
    "personalization-gain",
    "reward-personal",
    "seconds",
    # a learned reward model against the user's true utility (plotted only where there is one)
    "reward-model-accuracy",
    "reward-model-gap",
)


@dataclass
class ServerState:
    config: RunConfig
    corpus: Corpus
    tokenizer: PreTrainedTokenizerBase
    tokenizer_spec: TokenizerSpec
    model: PreTrainedModel  # holds the global parameters between rounds
    heldout: tuple[Example, ...]
    baselines: dict[str, float]
    shared_names: frozenset[str]  # what travels: everything but the clients' personal parameters

    @functools.cached_property
    def heldout_batches(self) -> list[Batch]:
        config = self.config
        return make_batches(
            self.tokenizer,
            self.heldout,
            32,
            config.max_source_tokens,
            config.max_target_tokens,
            prompt_code_start=config.prompt_code_start,
        )


def prepare(config: RunConfig, trained_tokenizer: bytes | None = None) -> ServerState:
    """Load data, tokenizer and the initial model; raises on any bad input. ``trained_tokenizer``:
    a resumed run's own (see :func:`~flhf_core.learning.model.server_tokenizer`)."""
    if "mlflow" in config.trackers:
        from flhf_core.results.mlflow_sink import require_mlflow

        require_mlflow()
    if config.reward_model != "none" and config.reward_model_encoder == "minilm":
        warm_start.checkpoint_folder()  # the pretrained extra, checked now, not in the first feedback round
    corpus = load_corpus(config)
    tokenizer, spec = server_tokenizer(config, corpus, trained_tokenizer)
    if config.prompt_code_start:
        check_distinct_codes(tokenizer, corpus.aspects)
    model = build_model(config, tokenizer)
    if config.init_from:
        start_from(model, tokenizer, config.init_from_path)
    model.to(select_device(config.device))
    heldout = partitions.heldout_examples(corpus, config)
    if not heldout:
        raise ConfigError(
            "the held-out set is empty: raise heldout-fraction, or give the dataset a test split "
            "(heldout-split = official)"
        )
    if not any(partitions.document_role(d, config) == partitions.REWARD for d in corpus.documents):
        raise ConfigError(
            f"reward-fraction: {config.reward_fraction} leaves no reward documents in {len(corpus.documents)} "
            "documents; raise it (users judge the model on these to steer aggregation)."
        )
    baselines = baseline_scores(heldout, corpus.by_id, config.lead_words)
    return ServerState(
        config, corpus, tokenizer, spec, model, heldout, baselines, shared_parameter_names(model, config)
    )


def start_from(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> None:
    """``init-from``: set ``model`` to the global model of the finished run in ``run_dir`` (its
    ``model/`` folder), e.g. a supervised phase trained once for every row of a seed. The
    saved model must be this run's: the same tokenizer, parameter names and shapes."""
    folder = run_dir / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"init-from: {run_dir} holds no global model (model/); give a finished run's folder."
        )
    from transformers import AutoTokenizer

    if tokenizer_fingerprint(AutoTokenizer.from_pretrained(folder)) != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"init-from: {folder} was trained with another tokenizer than this run's.")
    saved = canonical_parameters(load_pretrained(folder))
    params = canonical_parameters(model)
    differ = sorted(set(saved) ^ set(params)) or sorted(
        n for n in params if saved[n].shape != params[n].shape
    )
    if differ:
        raise ConfigError(
            f"init-from: {folder} is not this run's model (model, tiny-t5-size, copy-attention): "
            f"parameters {', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''} differ."
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def shared_parameter_names(model: PreTrainedModel, config: RunConfig) -> frozenset[str]:
    """The parameters the server sends and averages; checks the personalization fits the model.

    Under ``local-head`` the server keeps its round-0 copy of the personal layers (they are
    never sent). A LoRA adapter or a user conditioning exists only on the clients: the
    server's model has none.
    """
    if config.personalization in CLIENT_ONLY_PERSONALIZATIONS:
        try:
            with_personal_parameters(copy.deepcopy(model), config, seed=0)
        except (ValueError, AttributeError, NotImplementedError) as error:
            raise ConfigError(
                f"personalization: {config.personalization!r} does not fit {config.model!r}: {error}"
            ) from None
        return frozenset(canonical_parameters(model))
    personal = personal_parameter_names(model, config.personal_scope, config.personal_layers)
    return frozenset(canonical_parameters(model)) - personal


def build_strategy(config: RunConfig) -> FeedbackFedAvg:
    return FeedbackFedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=config.min_available_nodes,
        reward_weighting=config.reward_weighting,
        reward_temperature=config.reward_temperature,
        max_client_weight=config.max_client_weight,
        sampling_seed=config.seed,
        q=config.qffl_q,
        client_learning_rate=config.learning_rate,
        train_loss_key=REWARD_SHORTFALL,
        train_users=(LEARNER,) if config.mode == "centralized" else None,
        reward_models=reward_model_pool(config),
    )


def reward_model_pool(config: RunConfig) -> RewardModelExchange | None:
    """The server's reward models, for the modes that share them (federated: one cluster)."""
    if config.reward_model not in ("federated", "clustered"):
        return None
    clusters = config.reward_model_clusters if config.reward_model == "clustered" else 1
    return RewardModelExchange(RewardModelPool(clusters, seed=config.seed), budget=config.ratings_per_round)


LEARNER = 0  # centralized mode: the user whose node trains, on every user's data and feedback


def phase_learning_rate(config: RunConfig, phase: str, server_round: int) -> float:
    """The clients' learning rate in a round of ``phase`` (what q-FFL's L = 1 / lr estimates)."""
    return config.feedback_learning_rate if phase == "feedback" else round_learning_rate(config, server_round)


def round_learning_rate(config: RunConfig, server_round: int) -> float:
    """The clients' learning rate in ``server_round`` (1-based).

    ``cosine`` decays from ``learning-rate`` to a tenth of it at the last round: late rounds
    then average small, consistent client updates instead of noisy ones.
    """
    if config.lr_schedule == "constant" or config.num_server_rounds == 1:
        return config.learning_rate
    progress = (server_round - 1) / (config.num_server_rounds - 1)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def round_config(state: ServerState, phase: str, server_round: int, run_name: str) -> ConfigRecord:
    """What every message of a round tells the clients besides the parameters."""
    record = ConfigRecord(
        {
            PHASE: phase,
            RUN_NAME: run_name,  # the run folder's name (a timestamp when run-name is empty)
            TOKENIZER_SHA256: state.tokenizer_spec.sha256,
            LEARNING_RATE: round_learning_rate(state.config, server_round),
        }
    )
    if state.tokenizer_spec.payload:
        record[TOKENIZER_JSON] = state.tokenizer_spec.payload
    return record


NO_GLOBAL_MODEL = (
    "none: under personalization=local-head each user keeps its own LM head and last decoder "
    "block(s), and under mode=local-only its whole model, so no complete global model exists; "
    "see the users' figures (reward, reward-personal)"
)


def server_evaluate(state: ServerState, previous: PreTrainedModel | None = None) -> dict[str, float]:
    """The global model on the server's held-out examples (none without a global model); with
    the ``previous`` global model, also ``kl-to-previous`` (mean per-token KL(new || previous))."""
    if not state.config.has_global_model:
        return {}
    metrics = evaluate_model(
        state.model,
        state.tokenizer,
        state.heldout,
        state.config,
        reference=previous,
        batches=state.heldout_batches,
    )
    if "kl-to-reference" in metrics:
        metrics["kl-to-previous"] = metrics.pop("kl-to-reference")
    return metrics
