"""``sam-train`` in process: the config printout, help texts, unknown commands, export notes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

from trainer import cli
from trainer.config import ConfigError, config_keys, load_config, resolve_config
from trainer.presets import PRESETS, Config


def printed_config(capsys: pytest.CaptureFixture, *args: str) -> tuple[str, str]:
    """stdout and stderr of ``sam-train config ARGS``."""
    assert cli.main(["config", *args]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_printout_loads_back_to_the_same_config(preset: str, tmp_path: Path, capsys) -> None:
    text, _ = printed_config(capsys, "--config", preset)
    path = tmp_path / f"{preset}.toml"
    path.write_text(text)
    (from_file, problem_file), (from_preset, problem_preset) = (
        resolve_config(Config, str(path), (), PRESETS), resolve_config(Config, preset, (), PRESETS))
    assert from_file == from_preset and problem_file == problem_preset
    again, _ = printed_config(capsys, "--config", str(path))
    assert again.split("\n\n", 1)[1] == text.split("\n\n", 1)[1]  # only the header's command differs
    # Once the required keys are given, the printout is a config `train` accepts as it is.
    shards = "data.shards=/data/sa_*.tar"
    fixed, _ = printed_config(capsys, "--config", preset, "--set", shards, "--set", "model.encoder_init=random")
    path.write_text(fixed)
    assert load_config(Config, str(path), (), PRESETS) == load_config(
        Config, preset, [shards, "model.encoder_init=random"], PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_printout_documents_every_key_and_shows_required_markers(preset: str, capsys) -> None:
    text, err = printed_config(capsys, "--config", preset)
    cfg, problem = resolve_config(Config, preset, (), PRESETS)
    for key, kind in config_keys(cfg).items():
        doc = re.search(rf"^# {re.escape(key)} \({re.escape(kind)}\): (.+)$", text, re.M)
        assert doc, f"{key} has no comment line"
        assert not doc.group(1).startswith("undocumented"), f"{key} has no doc in its section's class"
    assert 'shards = "<required' in text  # no default dataset: the placeholder is shown
    assert problem and "data.shards" in problem
    assert "NOT VALID YET" in text and "data.shards" in err  # said where a reader looks


def test_config_bad_key_exits_2_naming_it(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["config", "--set", "optim.lrr=1e-4"])
    assert exit_info.value.code == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_config_sections_are_documented_in_the_docstring_style_they_use() -> None:
    from trainer.config import TrainConfig
    from trainer.config_docs import field_docs
    from trainer.data.config import DataConfig
    from trainer.model.build import ModelConfig

    assert field_docs(TrainConfig)["grad_clip"].startswith("max global L2 norm")  # Attributes: section
    assert field_docs(DataConfig)["batch_size"].startswith("Images per batch")  # string below the field
    assert field_docs(ModelConfig)["variant"].startswith("SAM size")  # #: comment above the field
    with pytest.raises(ConfigError, match="optim.lr"):
        resolve_config(Config, "tiny_cpu", ["optim.lr=-1"], PRESETS)  # section checks still raise


def test_unknown_or_missing_command_exits_2_on_stderr_and_help_exits_0(capsys) -> None:
    assert cli.main(["bogus"]) == 2
    captured = capsys.readouterr()
    assert "unknown command 'bogus'" in captured.err and "train" in captured.err and not captured.out
    assert cli.main([]) == 2
    assert "no command given" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "config" in capsys.readouterr().out


def test_train_help_lists_presets_required_shards_and_the_key_listing(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in PRESETS:
        assert re.search(rf"^  {name} .*requires .*data\.shards", text, re.M), name
    assert "data.shards is required" in text and "sam-train config --config PRESET" in text


def parser_of(command: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The real parser a subcommand builds, caught when it parses (nothing else runs)."""
    caught: list[argparse.ArgumentParser] = []

    def parse_args(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        caught.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(SystemExit):
        cli.main([command])
    return caught[0]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_option_has_help_and_shows_its_default(command: str, monkeypatch) -> None:
    parser = parser_of(command, monkeypatch)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert text.strip(), f"{command} {action.option_strings}: no help text"
        default = action.default
        says_nothing = default is None or default is False or (isinstance(default, (list, tuple)) and not default)
        if not (says_nothing or action.required or default is argparse.SUPPRESS):  # 0 is a default to show
            assert "default" in text and str(default) in text, (command, action.option_strings, text)


def test_export_of_a_tiny_checkpoint_says_no_registry_variant_loads_it(tmp_path: Path, capsys) -> None:
    from trainer.model import build_sam

    weights = tmp_path / "tiny.pt"
    torch.save(build_sam("tiny").state_dict(), weights)
    assert cli.main(["export", "--checkpoint", str(weights), "--out", str(tmp_path / "out.pth")]) == 0
    err = capsys.readouterr().err
    assert "'tiny' is not in segment_anything's sam_model_registry" in err
    assert "no official registry entry loads this file" in err
    assert (tmp_path / "out.pth").stat().st_size > 0  # still exported: our own loaders read it


def test_launch_help_needs_no_cluster(capsys) -> None:
    from trainer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "--help"])
    assert exit_info.value.code == 0
    assert "submit" in capsys.readouterr().out
