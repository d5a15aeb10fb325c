from __future__ import annotations

import dataclasses

import pytest

from flhf_core.config import PYPROJECT, ConfigError, RunConfig, load_preset, pyproject_defaults
from flhf_core.runs import cli
from flhf_core.runs.cli import merged_config, parse_override


def test_pyproject_declares_every_key_with_the_dataclass_default():
    declared = pyproject_defaults()
    fields = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}
    assert declared == fields


def test_every_key_has_a_comment_in_pyproject():
    lines = PYPROJECT.read_text().split("[tool.flwr.app.config]")[1].split("\n[")[0].splitlines()
    entries = [line for line in lines if "=" in line and not line.lstrip().startswith("#")]
    assert entries and all("#" in line.split("=", 1)[1] for line in entries)


def test_presets_are_valid():
    for preset in (PYPROJECT.parent / "configs").glob("*.toml"):
        RunConfig.from_mapping(load_preset(preset))


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown run-config key 'num-server-round'.*'num-server-rounds'"):
        RunConfig.from_mapping({"num-server-round": 3})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num-server-rounds", "3", "expected an integer"),
        ("num-server-rounds", 0, "out of range"),
        ("learning-rate", True, "expected a number"),
        ("partitioning", "random", "choose one of iid, dirichlet, preference"),
        ("tiny-t5-size", "xxl", "choose one of xs, s, m"),
        ("reward-weighting", "magic", "choose one of none"),
        ("dataset", "wikipedia", "use 'aclsum', a path to a local"),
        ("dataset", "data.parquet", "use 'aclsum', a path to a local"),
        ("document-sections", "abstract,methods", "subset of abstract, introduction, conclusion"),
        ("bf16", 1, "expected true or false"),
        ("run-name", "a/b", "plain folder name"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(key, value, message):
    with pytest.raises(ConfigError, match=key) as error:
        RunConfig.from_mapping({key: value})
    assert message in str(error.value)


def test_integers_are_accepted_for_floats():
    assert RunConfig.from_mapping({"learning-rate": 1}).learning_rate == 1.0


def test_results_dir_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunConfig.from_mapping({"results-dir": "out"}).results_path == tmp_path / "out"


def test_override_values_are_toml_or_plain_strings():
    assert parse_override("num-server-rounds=3") == ("num-server-rounds", 3)
    assert parse_override("bf16=false") == ("bf16", False)
    assert parse_override("dataset=aclsum") == ("dataset", "aclsum")
    assert parse_override("learning-rate=1e-3") == ("learning-rate", 0.001)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("num-server-rounds")


def test_launcher_merges_preset_and_overrides(tmp_path):
    config = merged_config("smoke", ["num-server-rounds=3", f"results-dir={tmp_path}"])
    assert config["num-server-rounds"] == 3  # override wins
    assert config["tiny-t5-size"] == "xs"  # from the preset
    assert config["learning-rate"] == pyproject_defaults()["learning-rate"]  # default
    assert config["results-dir"] == str(tmp_path)
    (tmp_path / "smoke").mkdir()
    assert merged_config("smoke", [f"results-dir={tmp_path}"])["run-name"] == "smoke-2"  # never reused


def test_launcher_rejects_unknown_preset_and_key():
    with pytest.raises(ConfigError, match=r"preset .nope. not found; presets: .*smoke"):
        merged_config("nope", [])
    with pytest.raises(ConfigError, match="unknown run-config key 'epochs'"):
        merged_config("smoke", ["epochs=3"])


def test_the_docs_document_every_key_and_ci_runs_the_readme_s_test_command():
    readme = (PYPROJECT.parent / "README.md").read_text()
    docs = "".join(page.read_text() for page in (PYPROJECT.parent / "docs").glob("*.md"))
    undocumented = [key for key in pyproject_defaults() if f"`{key}`" not in docs]
    assert not undocumented
    test_command = readme.split("Run the tests:")[1].split("```bash\n")[1].split("\n")[0]
    assert test_command in (PYPROJECT.parent / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    "key", ["learning-rate", "kl-coef", "reward-temperature", "round-timeout", "dpo-beta"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_with_the_key(key, value):
    with pytest.raises(ConfigError, match=f"{key}: .* is not a finite number"):
        RunConfig.from_mapping({key: value})


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (
            'aspect = "outcome"\n\n[[user]]\naspect = "outcome"\nlength_words = "long"\n',
            "length_words must be an integer",
        ),
        (
            'aspect = "outcome"\n\n[[user]]\naspect = "outcome"\nrating_noise = nan\n',
            "rating_noise must be a finite",
        ),
        ('aspect = "outcome"\n\n[[user]]\naspect = "method"\n', "aspect 'method' is not one of"),
        ('aspect = "outcome"\ninclude_keywords = "bleu"\n', "include_keywords must be a list of words"),
    ],
)
def test_a_bad_user_profile_file_is_refused_before_the_run(tmp_path, tables, message):
    """Every table is checked up front, also those only a later user would read."""
    path = tmp_path / "users.toml"
    path.write_text("[[user]]\n" + tables)
    with pytest.raises(ConfigError, match=f"user-profiles: .*{message}"):
        RunConfig.from_mapping({"user-profiles": str(path)})
    with pytest.raises(ConfigError, match="neither a preset"):
        RunConfig.from_mapping({"user-profiles": str(tmp_path / "absent.toml")})


def test_feedback_algorithm_without_feedback_rounds_is_refused_with_the_way_out():
    # the pyproject defaults: 8 rounds, all of them supervised
    with pytest.raises(
        ConfigError, match=r"'reinforce' would never run.*Set sft-rounds below num-server-rounds"
    ):
        RunConfig.from_mapping({**pyproject_defaults(), "feedback-algorithm": "reinforce"})
    config = RunConfig.from_mapping(
        {**pyproject_defaults(), "feedback-algorithm": "reinforce", "sft-rounds": 5}
    )
    assert config.phase(6) == "feedback"


def test_launcher_resolves_a_relative_profile_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.toml").write_text('[[user]]\naspect = "outcome"\n')
    config = merged_config("smoke", ["user-profiles=users.toml", f"results-dir={tmp_path}"])
    assert config["user-profiles"] == str(tmp_path / "users.toml")  # the apps run elsewhere


def test_reward_weighting_applies_to_feedback_rounds_unless_all():
    feedback = {"feedback-algorithm": "reinforce", "sft-rounds": 5}
    softmax = RunConfig.from_mapping({**feedback, "reward-weighting": "softmax"})
    assert (softmax.weighting("sft"), softmax.weighting("feedback")) == ("none", "softmax")
    everywhere = softmax.replace(**{"reward-weighting-rounds": "all"})
    assert everywhere.weighting("sft") == "softmax"
    assert RunConfig.from_mapping({**feedback, "reward-weighting": "qfedavg"}).weighting("sft") == "none"
    damped = RunConfig.from_mapping({**feedback, "feedback-server-learning-rate": 0.5})
    assert (damped.server_learning_rate("sft"), damped.server_learning_rate("feedback")) == (1.0, 0.5)
    sampled = RunConfig.from_mapping({**feedback, "fraction-train": 0.5, "sft-fraction-train": 0.25})
    assert (sampled.round_fraction_train("sft"), sampled.round_fraction_train("feedback")) == (0.25, 0.5)
    assert damped.round_fraction_train("sft") == damped.fraction_train  # 0: as fraction-train
    with pytest.raises(ConfigError, match="feedback rounds only"):  # the default sft run has none
        RunConfig.from_mapping({"reward-weighting": "softmax", "feedback-algorithm": "sft"})


@pytest.mark.parametrize("mode", ["local-only", "centralized"])
def test_baseline_modes_refuse_what_needs_an_average(mode):
    with pytest.raises(ConfigError, match="personalization"):
        RunConfig.from_mapping({"mode": mode, "personalization": "lora"})
    with pytest.raises(ConfigError, match="reward-weighting"):
        RunConfig.from_mapping({"mode": mode, "reward-weighting": "softmax"})
    with pytest.raises(ConfigError, match=f"feedback-server-learning-rate: .* mode='{mode}'"):
        RunConfig.from_mapping({"mode": mode, "feedback-server-learning-rate": 0.5})
    with pytest.raises(ConfigError, match="mode"):
        RunConfig.from_mapping({"mode": "solo"})
    config = RunConfig.from_mapping({"mode": mode})
    assert config.has_global_model == (mode == "centralized")
    assert config.evaluates_separately == (mode == "centralized")


def test_private_files_are_created_owner_only(tmp_path, monkeypatch):
    """A key is never readable by others, not even for a moment: created with mode 0600."""
    import os

    from flhf_core.common import write_private

    created = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        created.append(mode)
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    previous = os.umask(0o022)
    try:
        (tmp_path / "node.key").write_bytes(b"old")
        (tmp_path / "node.key").chmod(
            0o644
        )  # an existing, readable file: made private before it holds the secret
        write_private(tmp_path / "node.key", b"secret")
    finally:
        os.umask(previous)
    assert created == [0o600]
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "node.key").read_bytes() == b"secret"


def test_copy_attention_is_a_tiny_t5_option_as_its_size_is(tokenizer):
    from flhf_core.learning.copy_t5 import CopyT5ForConditionalGeneration
    from flhf_core.learning.model import build_model

    assert RunConfig().copy_attention  # the default model copies
    small = {"tiny-t5-size": "xs"}
    assert isinstance(build_model(RunConfig.from_mapping(small), tokenizer), CopyT5ForConditionalGeneration)
    plain = build_model(RunConfig.from_mapping({**small, "copy-attention": False}), tokenizer)
    assert not isinstance(plain, CopyT5ForConditionalGeneration)


def test_a_new_run_that_asks_to_resume_is_refused_before_any_folder_exists(tmp_path, capsys):
    """``flhf run PRESET resume=true`` once started a second folder and failed there, finding no
    checkpoint: a run is resumed with --resume, which the error names."""
    (tmp_path / "smoke").mkdir()
    with pytest.raises(ConfigError, match="--resume RUN_DIR"):
        merged_config("smoke", ["resume=true", f"results-dir={tmp_path}"])
    assert cli.main(["run", "smoke", "resume=true", f"results-dir={tmp_path}"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke"]
