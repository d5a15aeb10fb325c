"""One typed, validated view of the run config.

Flower hands both apps a flat ``{key: scalar}`` mapping whose keys are the
kebab-case names declared under ``[tool.flwr.app.config]`` in ``pyproject.toml``.
:meth:`RunConfig.from_mapping` turns it into a frozen dataclass and is the only
place where values are checked: every bad key or value raises
:class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from flhf_core.common import ConfigError, plain_name
from flhf_core.users.profiles import check_profiles

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

ASPECTS_ACLSUM = ("challenge", "approach", "outcome")
PARTITIONINGS = ("iid", "dirichlet", "preference", "codes")
HELDOUT_SPLITS = ("official", "hash")
TINY_T5_SIZES = ("xs", "s", "m")
REWARD_WEIGHTINGS = ("none", "linear", "softmax", "gain", "history", "qfedavg")
WEIGHTING_ROUNDS = ("feedback", "all")
MODES = ("federated", "local-only", "centralized")
FEEDBACK_ALGORITHMS = ("sft", "best-of-n", "reinforce", "ppo", "dpo")
REWARD_MODELS = ("none", "personal", "federated", "clustered")
REWARD_QUERIES = ("uniform", "active")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("constant", "cosine")
PERSONALIZATIONS = ("none", "local-head", "lora", "soft-prompt", "code-bandit")
ACLSUM_SECTIONS = ("abstract", "introduction", "conclusion")
TRACKERS = ("tensorboard", "mlflow")

# Keys a resumed run may change (``flhf run --resume RUN_DIR key=value``); every other key
# defines the experiment and must equal the checkpoint's. ``num-server-rounds`` extends (or
# shortens, down to the checkpoint's round) a run; with ``lr-schedule=cosine`` the remaining
# rounds then follow the new length's schedule. ``device`` moves a run between CPU and GPU:
# it goes on, but float results are no longer bit-equal to an uninterrupted run.
RESUMABLE_KEYS = frozenset(
    {
        "num-server-rounds",
        "round-timeout",
        "min-available-nodes",
        "checkpoint-every",
        "tracking",
        "mlflow-tracking-uri",
        "device",
        "resume",
        "results-dir",
        "run-name",
    }
)


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _range(low: float | None = None, high: float | None = None) -> dict[str, Any]:
    return {"low": low, "high": high}


# What a run saved before a key existed did, where that differs from the key's default: runs
# before ``heldout-split`` held out ``heldout-fraction`` of the documents by hash; runs before
# ``extractor`` read whole documents.
SAVED_BEFORE_KEY: dict[str, Any] = {"heldout-split": "hash", "extractor": "none"}


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key, with its type, default and allowed values.

    Field names are the keys with ``-`` replaced by ``_``. The defaults here are
    the ones pyproject declares (a test keeps the two in sync).
    """

    # --- federation -------------------------------------------------------
    mode: str = field(default="federated", metadata=_choice(*MODES))
    num_server_rounds: int = field(default=8, metadata=_range(1))
    fraction_train: float = field(default=1.0, metadata=_range(0.0, 1.0))
    fraction_evaluate: float = field(default=1.0, metadata=_range(0.0, 1.0))
    min_available_nodes: int = field(default=2, metadata=_range(1))
    round_timeout: float = field(default=600.0, metadata=_range(0.0))
    sft_rounds: int = field(default=8, metadata=_range(0))
    sft_fraction_train: float = field(default=0.0, metadata=_range(0.0, 1.0))
    reward_weighting: str = field(default="none", metadata=_choice(*REWARD_WEIGHTINGS))
    reward_weighting_rounds: str = field(default="feedback", metadata=_choice(*WEIGHTING_ROUNDS))
    reward_temperature: float = 0.1
    qffl_q: float = field(default=0.1, metadata=_range(0.0))
    max_client_weight: float = field(default=1.0, metadata=_range(1e-6, 1.0))
    feedback_server_learning_rate: float = field(default=1.0, metadata=_range(0.01, 1.0))
    seed: int = field(default=42, metadata=_range(0))
    # --- data ---------------------------------------------------------------
    dataset: str = "aclsum"
    document_field: str = "document"
    summary_fields: str = "summary"
    document_sections: str = "abstract"
    highlight_supervision: bool = False
    extractor: str = field(default="auto", metadata=_choice("auto", "none", "highlights"))
    extract_sentences: int = field(default=2, metadata=_range(1))
    aspect_prompt: str = field(default="name", metadata=_choice("name", "question"))
    partitioning: str = field(default="iid", metadata=_choice(*PARTITIONINGS))
    dirichlet_alpha: float = field(default=0.5, metadata=_range(1e-3))
    heldout_split: str = field(default="official", metadata=_choice(*HELDOUT_SPLITS))
    heldout_fraction: float = field(default=0.2, metadata=_range(0.0, 0.9))
    reward_fraction: float = field(default=0.1, metadata=_range(0.0, 0.9))
    reward_documents: int = field(default=16, metadata=_range(1))
    val_fraction: float = field(default=0.2, metadata=_range(0.0, 0.9))
    max_source_tokens: int = field(default=192, metadata=_range(8))
    max_target_tokens: int = field(default=64, metadata=_range(4))
    # --- model ----------------------------------------------------------------
    model: str = "tiny-t5"
    init_from: str = ""
    tiny_t5_size: str = field(default="s", metadata=_choice(*TINY_T5_SIZES))
    copy_attention: bool = True
    decoder_start: str = field(default="model", metadata=_choice("model", "prompt-code"))
    personalization: str = field(default="none", metadata=_choice(*PERSONALIZATIONS))
    personal_layers: int = field(default=1, metadata=_range(0))
    lora_rank: int = field(default=8, metadata=_range(1))
    soft_prompt_tokens: int = field(default=8, metadata=_range(1))
    personal_epochs: int = field(default=1, metadata=_range(0))
    device: str = field(default="auto", metadata=_choice(*DEVICES))
    bf16: bool = True
    # --- local training -----------------------------------------------------
    local_epochs: int = field(default=2, metadata=_range(1))
    batch_size: int = field(default=16, metadata=_range(1))
    learning_rate: float = field(default=2e-3, metadata=_range(0.0, 1.0))
    lr_schedule: str = field(default="constant", metadata=_choice(*LR_SCHEDULES))
    weight_decay: float = field(default=0.01, metadata=_range(0.0))
    max_grad_norm: float = field(default=1.0, metadata=_range(0.0))
    group_by_length: bool = True
    # --- feedback ------------------------------------------------------------
    feedback_algorithm: str = field(default="sft", metadata=_choice(*FEEDBACK_ALGORITHMS))
    user_profiles: str = "aspects"
    feedback_steps: int = field(default=10, metadata=_range(1))
    feedback_prompts: int = field(default=8, metadata=_range(1))
    samples_per_prompt: int = field(default=4, metadata=_range(2))
    ratings_per_round: int = field(default=0, metadata=_range(0))
    reward_model: str = field(default="none", metadata=_choice(*REWARD_MODELS))
    reward_model_encoder: str = field(default="summarizer", metadata=_choice("summarizer", "minilm"))
    reward_model_steps: int = field(default=4, metadata=_range(1))
    reward_model_learning_rate: float = field(default=1e-4, metadata=_range(1e-8))
    reward_model_length_learning_rate: float = field(default=3e-2, metadata=_range(1e-8))
    reward_model_clusters: int = field(default=2, metadata=_range(2))
    reward_model_personal_head: bool = False
    reward_model_trust: float = field(default=0.55, metadata=_range(0.0, 0.9))  # 32/32's Wilson bound is 0.92
    reward_queries: str = field(default="uniform", metadata=_choice(*REWARD_QUERIES))
    feedback_learning_rate: float = field(default=3e-4, metadata=_range(0.0, 1.0))
    personal_feedback_learning_rate: float = field(default=3e-4, metadata=_range(0.0, 10.0))
    kl_coef: float = field(default=0.05, metadata=_range(0.0))
    sample_temperature: float = field(default=1.0, metadata=_range(1e-3))
    ppo_epochs: int = field(default=4, metadata=_range(1))
    ppo_clip: float = field(default=0.2, metadata=_range(1e-3, 1.0))
    dpo_beta: float = field(default=0.1, metadata=_range(1e-4))
    # --- generation and evaluation ------------------------------------------
    num_beams: int = field(default=1, metadata=_range(1))
    no_repeat_ngram_size: int = field(default=3, metadata=_range(0))
    encoder_repetition_penalty: float = field(default=1.0, metadata=_range(1e-3))
    max_new_tokens: int = field(default=48, metadata=_range(1))
    eval_max_examples: int = field(default=64, metadata=_range(0))
    heldout_max_examples: int = field(default=150, metadata=_range(0))
    evaluate_every: int = field(default=1, metadata=_range(1))
    separate_evaluation: bool = False
    lead_words: int = field(default=25, metadata=_range(1))
    # --- results --------------------------------------------------------------
    results_dir: str = "results"
    run_name: str = ""
    checkpoint_every: int = field(default=1, metadata=_range(1))
    tracking: str = "tensorboard"
    mlflow_tracking_uri: str = ""
    resume: bool = False

    # ------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Validate a kebab-case mapping; unspecified keys take their defaults."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        types = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
                raise ConfigError(
                    f"unknown run-config key '{key}'.{suggestion} Known keys: {', '.join(sorted(known))}."
                )
            spec = known[key]
            kwargs[spec.name] = _coerce(key, value, types[spec.name], spec.metadata)
        config = cls(**kwargs)
        config._check_semantics()
        return config

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> RunConfig:
        """A config a run saved (``config.json``, a checkpoint's): a key it lacks because it came
        later means what the run did then (:data:`SAVED_BEFORE_KEY`), not today's default."""
        return cls.from_mapping({**SAVED_BEFORE_KEY, **values})

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case mapping, as Flower's run config spells it."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return RunConfig.from_mapping({**self.to_mapping(), **changes})

    # ------------------------------------------------------------------------
    @property
    def aspects(self) -> tuple[str, ...]:
        """The corpus's aspects: aclsum's three, or one per summary field of other data."""
        return ASPECTS_ACLSUM if self.dataset == "aclsum" else self.summary_field_list

    def _check_user_profiles(self) -> None:
        """``user-profiles`` is a preset or a TOML file whose every table builds a valid profile;
        users who want a mix of aspects are judged against a control code's target, which only
        ``partitioning = codes`` derives."""
        check_profiles(self.user_profiles, self.aspects, mixes=self.partitioning == "codes")

    @property
    def prompt_code_start(self) -> bool:
        """Whether the decoder starts from the prompt's control code (``decoder-start``)."""
        return self.decoder_start == "prompt-code"

    @property
    def extracts(self) -> bool:
        """Whether the model reads extracted sentences (``extractor``; ``auto``: on aclsum's
        official split where prompts name the aspect)."""
        if self.extractor == "auto":
            return (
                self.dataset == "aclsum"
                and self.heldout_split == "official"
                and self.partitioning not in ("preference", "codes")
            )
        return self.extractor == "highlights"

    @property
    def _prompts_name_the_aspect(self) -> bool:
        return self.aspect_prompt == "name" and self.partitioning not in ("preference", "codes")

    @property
    def summary_field_list(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.summary_fields.split(",") if s.strip())

    @property
    def section_list(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.document_sections.split(",") if s.strip())

    @property
    def init_from_path(self) -> Path:
        """``init-from`` as an absolute path (resolved as ``results-dir`` is)."""
        return Path(self.init_from).expanduser().resolve()

    @property
    def results_path(self) -> Path:
        """``results-dir`` as an absolute path.

        The ServerApp runs in the SuperLink's working directory, so a relative
        path is resolved against the caller's directory by the launcher and
        against the current directory here, and always printed.
        """
        return Path(self.results_dir).expanduser().resolve()

    @property
    def trackers(self) -> tuple[str, ...]:
        """The tracking backends besides the files (``tracking``, comma separated; "none" = files only)."""
        names = tuple(t.strip() for t in self.tracking.split(",") if t.strip())
        return () if names == ("none",) else names

    @property
    def run_path(self) -> Path:
        """``<results-dir>/<run-name>``."""
        return self.results_path / self.run_name

    @property
    def personal_scope(self) -> str:
        """What never leaves a client: ``personalization``'s parameters, or ``all`` of them (local-only)."""
        return "all" if self.mode == "local-only" else self.personalization

    @property
    def evaluates_separately(self) -> bool:
        """Evaluate messages after each evaluated round: ``separate-evaluation``, and always when
        centralized (one learner trains; every user must still evaluate the model)."""
        return self.separate_evaluation or self.mode == "centralized"

    def round_fraction_train(self, phase: str) -> float:
        """The share of users sampled for training in a round of ``phase``: ``sft-fraction-train``
        in supervised rounds where it is set, else ``fraction-train``."""
        if phase == "sft" and self.sft_fraction_train > 0:
            return self.sft_fraction_train
        return self.fraction_train

    def server_learning_rate(self, phase: str) -> float:
        """The server's step towards the users' average in a round of ``phase``: supervised
        rounds are plain FedAvg (1.0)."""
        return self.feedback_server_learning_rate if phase == "feedback" else 1.0

    def weighting(self, phase: str) -> str:
        """The reward weighting of a round of ``phase``: supervised rounds are plain FedAvg
        unless ``reward-weighting-rounds = all``."""
        if self.reward_weighting_rounds == "all" or phase != "sft":
            return self.reward_weighting
        return "none"

    @property
    def has_global_model(self) -> bool:
        """Whether the federation has a complete global model that anyone could use.

        Under ``local-head`` the LM head and the last decoder blocks exist only on the
        users' devices: the server holds a body without a trained head, which is neither
        published nor evaluated as if it were a model. Under ``mode = local-only`` nothing is
        averaged: each user's model is its own.
        """
        return self.personalization != "local-head" and self.mode != "local-only"

    def evaluates(self, server_round: int) -> bool:
        """Whether the model of ``server_round`` is evaluated (round 0, every ``evaluate-every``, the last)."""
        return server_round % self.evaluate_every == 0 or server_round == self.num_server_rounds

    def phase(self, server_round: int) -> str:
        """``sft`` for the first ``sft-rounds`` rounds (and always with the sft algorithm), else ``feedback``."""
        if self.feedback_algorithm == "sft" or server_round <= self.sft_rounds:
            return "sft"
        return "feedback"

    def _check_semantics(self) -> None:
        if self.extractor == "highlights" and self.heldout_split != "official":
            raise ConfigError(
                f"extractor: {self.extractor!r} is fitted on the official train papers' highlights; "
                "under heldout-split='hash' some of them are held out. Use heldout-split='official' "
                "or extractor='none'."
            )
        if self.decoder_start == "prompt-code" and not self._prompts_name_the_aspect:
            setting = (
                "aspect-prompt='question'"
                if self.aspect_prompt == "question"
                else f"partitioning={self.partitioning!r}"
            )
            raise ConfigError(
                f"decoder-start: 'prompt-code' starts the decoder from the prompt's first word piece, which "
                f"under {setting} is the same for every aspect. Use aspect-prompt='name' with another "
                "partitioning, or decoder-start='model'."
            )
        if self.extractor == "highlights" and self.partitioning in ("preference", "codes"):
            raise ConfigError(
                f"extractor: {self.extractor!r} picks sentences for the aspect the prompt names; under "
                f"partitioning={self.partitioning!r} a user's requests are neutral. Use partitioning "
                "'iid' or 'dirichlet', or extractor='none'."
            )
        if self.personalization in ("soft-prompt", "code-bandit") and self.feedback_algorithm == "sft":
            raise ConfigError(
                f"feedback-algorithm: 'sft' never trains personalization={self.personalization!r}, which learns "
                "from feedback only; choose best-of-n, reinforce, ppo or dpo."
            )
        if (
            self.feedback_learning_rate == 0
            and self.personalization == "none"
            and self.feedback_algorithm != "sft"
        ):
            raise ConfigError(
                "feedback-learning-rate: 0 leaves nothing to learn from feedback without personal parameters; "
                "raise it, or choose a personalization whose parameters learn at personal-feedback-learning-rate."
            )
        if self.init_from and (self.mode == "local-only" or self.personalization == "local-head"):
            raise ConfigError(
                "init-from: the saved model reaches users through the parameters the server sends; under "
                f"mode={self.mode!r}, personalization={self.personalization!r} part of it never would."
            )
        if self.partitioning == "codes" and self.highlight_supervision:
            raise ConfigError(
                "highlight-supervision: its extra examples are prompted by bare aspects, which no control code "
                "uses under partitioning='codes'; set it to false."
            )
        if self.personalization == "code-bandit":
            if self.reward_model != "none":
                raise ConfigError(
                    "reward-model: 'code-bandit' learns from the user's judgements alone (its rows are the "
                    "bound a learned conditioning must clear); set reward-model='none'."
                )
            if self.partitioning != "codes":
                raise ConfigError(
                    "personalization: 'code-bandit' picks among control codes, which only partitioning='codes' "
                    f"teaches the model; this run has partitioning={self.partitioning!r}."
                )
            if self.feedback_learning_rate != 0:
                raise ConfigError(
                    "feedback-learning-rate: 'code-bandit' keeps the shared model as it is (every judgement "
                    "goes to choosing a code); set it to 0."
                )
        if not self.summary_field_list:
            raise ConfigError("summary-fields: give at least one field name, comma separated.")
        if self.dataset == "aclsum":
            bad = [s for s in self.section_list if s not in ACLSUM_SECTIONS]
            if bad or not self.section_list:
                raise ConfigError(
                    f"document-sections: {self.document_sections!r} is not allowed; use a "
                    f"comma-separated subset of {', '.join(ACLSUM_SECTIONS)}."
                )
        elif self.highlight_supervision:
            raise ConfigError(
                f"highlight-supervision: needs aclsum's highlight labels; dataset {self.dataset!r} has "
                "none. Use dataset='aclsum' or highlight-supervision=false."
            )
        elif self.extractor == "highlights":
            raise ConfigError(
                f"extractor: {self.extractor!r} is fitted on aclsum's highlight labels; dataset "
                f"{self.dataset!r} has none. Use dataset='aclsum' or extractor='none'."
            )
        elif not (self.dataset.startswith("hf:") and len(self.dataset) > 3):
            suffix = Path(self.dataset).suffix.lower()
            if suffix not in (".jsonl", ".json", ".csv"):
                raise ConfigError(
                    f"dataset: {self.dataset!r} is not allowed; use 'aclsum', a path to a "
                    "local .jsonl/.json/.csv file, or 'hf:<name or local folder>'."
                )
        if self.model != "tiny-t5" and not self.model.strip():
            raise ConfigError("model: give 'tiny-t5', a Hugging Face name or a local path.")
        if self.reward_temperature == 0.0:
            raise ConfigError("reward-temperature: must not be 0 (negative favours the worst-served users).")
        if 0 < self.ratings_per_round < self.samples_per_prompt and self.feedback_algorithm not in (
            "sft",
            "dpo",
        ):
            raise ConfigError(
                f"ratings-per-round: {self.ratings_per_round} is below the {self.samples_per_prompt} ratings "
                f"one step of {self.feedback_algorithm} needs (a document's samples-per-prompt samples are "
                f"rated together); use 0 (unlimited) or at least {self.samples_per_prompt}."
            )
        if self.reward_queries == "active" and self.reward_model == "none":
            raise ConfigError(
                "reward-queries: 'active' asks about what a learned reward model is least sure of; "
                "set reward-model (personal, federated or clustered), or reward-queries='uniform'."
            )
        if self.reward_model != "none":
            if self.ratings_per_round == 0 or self.feedback_algorithm == "sft":
                raise ConfigError(
                    f"reward-model: {self.reward_model!r} scores the samples a user did not judge; set "
                    "ratings-per-round > 0 and a feedback-algorithm (an unlimited budget judges them all)."
                )
            if self.mode == "centralized":
                raise ConfigError(
                    f"reward-model: {self.reward_model!r} is a user's own; mode='centralized' pools every "
                    "user's feedback in one learner. Use reward-model='none' there."
                )
            if self.reward_model_personal_head and self.reward_model == "personal":
                raise ConfigError(
                    "reward-model-personal-head: a personal reward model is personal whole; the key "
                    "applies to reward-model 'federated' or 'clustered'."
                )
            if self.mode == "local-only" and self.reward_model in ("federated", "clustered"):
                raise ConfigError(
                    f"reward-model: {self.reward_model!r} shares reward models between users; "
                    "mode='local-only' keeps every user alone. Use reward-model='personal' there."
                )
        if self.feedback_algorithm == "dpo" and self.samples_per_prompt % 2:
            raise ConfigError("samples-per-prompt: dpo pairs samples, so it must be even.")
        if self.heldout_fraction + self.val_fraction >= 1.0:
            raise ConfigError("heldout-fraction + val-fraction must stay below 1.")
        if self.reward_fraction + self.val_fraction >= 1.0:
            raise ConfigError(
                "reward-fraction + val-fraction must stay below 1: users need documents to train on."
            )
        if self.feedback_algorithm != "sft" and self.sft_rounds >= self.num_server_rounds:
            raise ConfigError(
                f"feedback-algorithm: {self.feedback_algorithm!r} would never run: sft-rounds "
                f"({self.sft_rounds}) >= num-server-rounds ({self.num_server_rounds}), so every round is "
                f"supervised. Set sft-rounds below num-server-rounds (e.g. sft-rounds="
                f"{max(self.num_server_rounds - 3, 0)}) to get feedback rounds, or feedback-algorithm='sft'."
            )
        self._check_user_profiles()
        if self.mode != "federated":
            if self.personalization != "none":
                raise ConfigError(
                    f"personalization: {self.personalization!r} does not combine with mode={self.mode!r} "
                    "(local-only keeps every parameter on the client; centralized has one learner); use 'none'."
                )
            if self.reward_weighting != "none":
                raise ConfigError(
                    f"reward-weighting: {self.reward_weighting!r} needs an average of users' models, and "
                    f"mode={self.mode!r} has none; use 'none'."
                )
            if self.feedback_server_learning_rate != 1.0:
                raise ConfigError(
                    "feedback-server-learning-rate: the server's step towards the users' average; "
                    f"mode={self.mode!r} averages no users' models. Use 1.0."
                )
        if (
            self.reward_weighting != "none"
            and self.reward_weighting_rounds == "feedback"
            and self.phase(self.num_server_rounds) == "sft"
        ):
            raise ConfigError(
                f"reward-weighting: {self.reward_weighting!r} weights feedback rounds only "
                "(reward-weighting-rounds = 'feedback'), and this run has none; use reward-weighting = "
                "'none', or reward-weighting-rounds = 'all' to weight supervised rounds."
            )
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown or not self.tracking.strip():
            raise ConfigError(
                f"tracking: {self.tracking!r} is not allowed; use 'none' or a comma-separated subset of "
                f"{', '.join(TRACKERS)} (the files — metrics.jsonl, summary.json, plots — are always written)."
            )
        if self.resume and not self.run_name:
            raise ConfigError("resume: true needs the run-name of the run to continue.")
        if self.run_name:
            plain_name(self.run_name, "run-name")


def _coerce(key: str, value: Any, kind: type, rules: Mapping[str, Any]) -> Any:
    """Check one value against its field's type, range and choices."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}.")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}.")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}.")
        value = float(value)
        if not math.isfinite(value):  # NaN passes every range check: comparisons with it are false
            raise ConfigError(f"{key}: {value!r} is not a finite number.")
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}.")
    choices = rules.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(choices)}.")
    low, high = rules.get("low"), rules.get("high")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key}: {value!r} is out of range; it must be {bounds}.")
    return value


def pyproject_defaults(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """The run-config defaults declared in ``[tool.flwr.app.config]``."""
    with pyproject.open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def load_preset(path: Path) -> dict[str, Any]:
    """Read a preset TOML file (flat ``key = value`` pairs)."""
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"preset file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"preset file {path} is not valid TOML: {error}") from None
    nested = [k for k, v in values.items() if isinstance(v, dict | list)]
    if nested:
        raise ConfigError(f"preset file {path}: values must be scalars, not {nested}.")
    return values
