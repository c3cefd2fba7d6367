"""Options: YAML defaults, flag overrides, unknown keys, validation."""

import dataclasses

import pytest
import yaml

from memmit.config import MemmitConfig, build_parser, parse_args

BASE = ["--pretrained_model_name_or_path", "p", "--dataset_name", "d"]


def test_yaml_gives_defaults_and_flags_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_shards: 3\nlearning_rate: 1e-4\ncenter_crop: true\nmax_grad_norm: null\n")
    cfg = parse_args(BASE + ["--config", str(path), "--num_shards", "5", "--no-center_crop"])
    assert cfg.num_shards == 5 and cfg.center_crop is False
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.max_grad_norm is None
    assert parse_args(BASE + ["--config", str(path)]).num_shards == 3


def test_unknown_yaml_key_names_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_shard: 3\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_shard'\].*num_shards"):
        parse_args(BASE + ["--config", str(path)])


@pytest.mark.parametrize("flag,value,message", [
    ("--num_shards", "0", "num_shards must be >= 1"),
    ("--agc_lambda", "-0.1", "agc_lambda must be >= 0"),
    ("--agc_bank_decay", "1.0", r"agc_bank_decay must be in \[0, 1\)"),
    ("--num_rounds", "0", "num_rounds must be >= 1"),
    ("--shard_strategy", "hash", "shard_strategy='hash' is not one of"),
    ("--mixed_precision", "fp8", "mixed_precision='fp8'"),
    ("--train_batch_size", "0", "train_batch_size must be >= 1"),
    ("--dataloader_num_workers", "-1", "dataloader_num_workers must be >= 0"),
    ("--seed", "-1", "seed must be >= 0"),
    ("--cache_text_limit_gb", "-1", "cache_text_limit_gb must be >= 0, got -1.0"),
])
def test_invalid_values(flag, value, message):
    with pytest.raises(ValueError, match=message):
        parse_args(BASE + [flag, value])


def test_stratified_needs_label_and_one_data_source():
    with pytest.raises(ValueError, match="label_column"):
        parse_args(BASE + ["--shard_strategy", "stratified"])
    with pytest.raises(ValueError, match="exactly one of dataset_name or train_data_dir"):
        parse_args(BASE + ["--train_data_dir", "x"])


def test_saved_config_round_trips(tmp_path):
    cfg = parse_args(BASE + ["--agc_lambda", "0.25"])
    cfg.save(tmp_path / "c.yaml")
    assert MemmitConfig(**yaml.safe_load((tmp_path / "c.yaml").read_text())) == cfg


def test_help_shows_each_default_and_what_is_required():
    text = " ".join(build_parser().format_help().split())
    assert "with a unet or a transformer. (required)" in text
    assert "(default: ['to_q', 'to_k', 'to_v', 'to_out.0'])" in text and "(default: 0.8)" in text


def test_the_option_reference_is_generated_from_the_config():
    """docs/options.md is `make docs`'s output: an option added, renamed or re-documented without it fails here."""
    from pathlib import Path

    from memmit.config import EvalConfig, options_markdown

    reference = (Path(__file__).resolve().parents[1] / "docs" / "options.md").read_text()
    assert reference == options_markdown()
    for f in dataclasses.fields(MemmitConfig) + dataclasses.fields(EvalConfig):
        assert f"| `--{f.name}`" in reference


@pytest.mark.parametrize("body, message", [
    ('num_shards: 2\ncenter_crop: "false"\n', "center_crop ('{path}', line 2) must be true or false (unquoted), got 'false'"),
    ("num_rounds: 1.7\n", "num_rounds ('{path}', line 1) must be an integer, got 1.7"),
    ("num_rounds: two\n", "num_rounds ('{path}', line 1) must be an integer, got 'two'"),
    ("seed: 1\nnum_rounds: [1, 2]\n", "num_rounds ('{path}', line 2) takes one int, got [1, 2]"),
    ("mixed_precision: no\n", "mixed_precision ('{path}', line 1) must be a string, got False: YAML reads an unquoted no"),
    ("dedup: maybe\n", "dedup='maybe' ('{path}', line 1) is not one of ['none', 'keep_one', 'same_shard']"),
    ("lora_target_modules: to_q\n", "lora_target_modules ('{path}', line 1) must be a list of strings, got 'to_q'"),
    ("num_shards: 2\nnum_rounds: [\n", "config file '{path}', line 3 is not valid YAML"),
    ("seed: 1\nbogus: 3\n", "unknown option(s) ['bogus'] in '{path}' (line 2)"),
])
def test_yaml_is_read_strictly_naming_the_option_file_and_line(tmp_path, body, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    with pytest.raises(ValueError) as exc:
        parse_args(["--config", str(path), *BASE])
    assert message.format(path=path) in str(exc.value)


def test_yaml_numbers_in_float_options_and_quoted_strings_read_as_meant(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text('learning_rate: 1e-4\nagc_lambda: 1\nmixed_precision: "no"\nnum_shards: 3\n')
    cfg = parse_args(["--config", str(path), *BASE])
    assert (cfg.learning_rate, cfg.agc_lambda, cfg.mixed_precision, cfg.num_shards) == (1e-4, 1.0, "no", 3)
    assert isinstance(cfg.agc_lambda, float)


def test_a_bad_config_writes_nothing(tiny_pipeline, digits_dir, tmp_path, capsys):
    from memmit.cli import train_main

    path = tmp_path / "recipe.yaml"
    path.write_text("num_rounds: 1.7\n")
    out = tmp_path / "out"
    assert train_main(["--config", str(path), "--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name",
                       digits_dir, "--output_dir", str(out)]) == 2
    assert "num_rounds" in capsys.readouterr().err and not out.exists()


def test_a_flag_of_the_wrong_type_names_the_option(capsys):
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--num_rounds", "1.7"])
    assert "argument --num_rounds: invalid int value: '1.7'" in capsys.readouterr().err
