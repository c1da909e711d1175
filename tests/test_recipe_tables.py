"""The built-in recipes' own keys, in their own tables: [asr], [localization],
[classification]; the flat names of before as documented aliases; old run folders resume."""

from __future__ import annotations

import tomllib

import pytest

import dpfl
from dpfl.config import ALIASES, TABLES, RunConfig
from dpfl.server.round import load_checkpoint, save_checkpoint


def test_every_recipe_key_lives_in_its_table_and_the_flat_names_alias_them():
    assert set(TABLES) == {"classification", "asr", "localization"}
    core = {key for key, _, _ in RunConfig.describe_defaults() if "." not in key}
    for old, new in ALIASES.items():
        assert old not in core and new.split(".")[0] in TABLES
    toml = tomllib.loads('task = "asr"\n[asr]\nsize = "small"\ndata-dir = "/c"\n')
    flat = {"task": "asr", "asr-size": "small", "data-dir": "/c"}
    dotted = {"task": "asr", "asr.size": "small", "asr.data-dir": "/c"}
    configs = [RunConfig.from_mapping(v) for v in (toml, flat, dotted)]
    assert configs[0].to_dict() == configs[1].to_dict() == configs[2].to_dict()
    assert configs[0].options("asr").size == "small" and configs[0].to_dict()["asr.size"] == "small"
    assert "asr-size" not in configs[0].to_dict()


def test_bad_table_keys_and_values_name_the_table_key():
    with pytest.raises(ValueError, match="unknown config key asr.sise; did you mean 'size'"):
        RunConfig.from_mapping({"asr.sise": "tiny"})
    with pytest.raises(ValueError, match="config key asr.size = 'huge': expected one of tiny"):
        RunConfig.from_mapping({"asr-size": "huge"})  # the old name's error names the new key
    with pytest.raises(ValueError, match="config key localization.penalty = -1"):
        RunConfig.from_mapping({"localization": {"penalty": -1.0}})
    with pytest.raises(ValueError, match="config key classification.hidden"):
        RunConfig.from_mapping({"hidden": "a,b"})
    with pytest.raises(ValueError, match="config key asr is a table"):
        RunConfig.from_mapping({"asr": "tiny"})


def test_the_cli_takes_table_keys_and_their_old_flat_names():
    from dpfl.cli import _config_from_args, build_parser

    parser = build_parser()
    for flags in (["--asr.size", "small"], ["--asr-size", "small"]):
        args = parser.parse_args(["simulate", "--task", "asr", *flags])
        assert _config_from_args(args).options("asr").size == "small"
    help_text = parser.subcommand("simulate").format_help()
    assert "--asr.size V, --asr-size V" in help_text


def run(tmp_path, rounds, **kw):
    config = {"population": 40, "cohort-size": 8.0, "rounds": rounds, "checkpoint-every": 1,
              "classification.examples-per-user": 10, "hidden": "16", "target-epsilon": 0.0,
              "noise-multiplier": 1.0, "noise-seed": 1, "sampling-seed": 2,
              "run-dir": str(tmp_path / "run")}  # fmt: skip
    return dpfl.simulate(config, progress=False, **kw)


def test_a_run_folder_written_with_flat_keys_still_resumes(tmp_path):
    """A checkpoint of format 1 (flat keys, before the tables) is read through the aliases."""
    run(tmp_path, 2)
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == 2
    flat_name = {new: old for old, new in ALIASES.items()}
    ckpt["config"] = {flat_name.get(k, k): v for k, v in ckpt["config"].items()}
    assert "examples-per-user" in ckpt["config"] and "asr-size" in ckpt["config"]
    del ckpt["format"]
    save_checkpoint(path, ckpt)
    extended = run(tmp_path, 3, resume=True)
    assert extended["rounds_run"] == 3
    # a changed recipe key is still refused by its table name
    save_checkpoint(path, {**ckpt, "config": {**ckpt["config"], "hidden": "32"}})
    with pytest.raises(ValueError, match=r"classification.hidden: '32' -> '16'"):
        run(tmp_path, 4, resume=True)


def test_a_checkpoint_of_a_newer_format_is_refused_naming_it(tmp_path):
    run(tmp_path, 1)
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, {**load_checkpoint(path), "format": 7})
    with pytest.raises(ValueError, match="checkpoint has format 7, newer than this dpfl's 2"):
        run(tmp_path, 2, resume=True)
