"""Config machinery on a toy tree built from the engine's own sections plus a toy one."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from trainer.config import (
    EXIT_CONFIG_ERROR,
    CheckpointConfig,
    ConfigError,
    EvalConfig,
    LogConfig,
    TrainConfig,
    config_from_cli,
    config_keys,
    dump_toml,
    from_dict,
    load_config,
    to_dict,
)


@dataclass(kw_only=True)
class ToyOptim:
    """A section with the type variety the parser must handle."""

    lr: float = 1e-3
    iterations: int = 100
    warmup: int = 10
    betas: tuple[float, float] = (0.9, 0.999)
    milestones: tuple[int, ...] = (50, 80)
    schedule: Literal["step", "cosine"] = "step"
    clip: Optional[float] = None
    tag: str | None = "x"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class Inner:
    depth: int = 2


@dataclass(kw_only=True)
class ToyModel:
    width: int = 8
    inner: Inner = field(default_factory=Inner)


@dataclass(kw_only=True)
class Root:
    name: str = "toy"
    model: ToyModel = field(default_factory=ToyModel)
    optim: ToyOptim = field(default_factory=ToyOptim)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        if self.optim.warmup > self.optim.iterations:
            raise ValueError(f"optim.warmup: {self.optim.warmup} exceeds optim.iterations "
                             f"{self.optim.iterations}")


PRESETS = {
    "small": lambda: Root(optim=ToyOptim(lr=0.5, iterations=200), train=TrainConfig(seed=1)),
}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_and_preset() -> None:
    assert load_config(Root, "", [], PRESETS) == Root()
    assert load_config(Root, "small", [], PRESETS).optim.lr == 0.5


def test_precedence_preset_then_toml_then_set(tmp_path: Path) -> None:
    path = write(tmp_path, """
        preset = "small"
        [optim]
        iterations = 300
        lr = 0.25
        [train]
        run_dir = "gs://b/runs/x"
    """)
    cfg = load_config(Root, path, ["optim.lr=1e-4"], PRESETS)
    assert cfg.optim.lr == 1e-4  # --set beats the file
    assert cfg.optim.iterations == 300  # the file beats the preset
    assert cfg.train.seed == 1  # the preset beats the defaults
    assert cfg.train.run_dir == "gs://b/runs/x"


def test_set_parses_by_annotated_type() -> None:
    cfg = load_config(Root, "", [
        "optim.iterations=1e5", "optim.betas=0.8,0.99", "optim.milestones=[10, 20, 30]",
        "optim.schedule=cosine", "optim.clip=1.5", "optim.tag=none", "train.compile=true",
        "eval.shards=gs://b/val-*.tar,gs://c/v.tar", "model.inner.depth=5", "name=a=b",
    ])
    assert cfg.optim.iterations == 100_000
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.optim.milestones == (10, 20, 30)
    assert cfg.optim.schedule == "cosine"
    assert cfg.optim.clip == 1.5 and cfg.optim.tag is None
    assert cfg.train.compile is True
    assert cfg.eval.shards == ("gs://b/val-*.tar", "gs://c/v.tar")
    assert cfg.model.inner.depth == 5
    assert cfg.name == "a=b"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr: unknown key (did you mean 'lr'?)"),
    ("model.inner.deep=1", "model.inner.deep: unknown key"),
    ("nope.x=1", "nope: unknown key"),
    ("optim=1", "optim: is a section"),
    ("optim.iterations=many", "optim.iterations: cannot parse 'many' as int"),
    ("train.compile=maybe", "train.compile: cannot parse 'maybe' as bool"),
    ("train.amp=fp8", "train.amp: must be one of 'auto', 'bf16', 'off', got 'fp8'"),
    ("optim.betas=0.9", "optim.betas: expected 2 comma-separated items"),
    ("optim.lr", "expected KEY=VALUE"),
])
def test_set_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config(Root, "", [override])
    assert message in str(err.value)


def test_toml_unknown_key_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.inner\.deep: unknown key"):
        load_config(Root, write(tmp_path, "[model.inner]\ndeep = 3\n"))
    with pytest.raises(ConfigError, match=r"^train\.seed: expected int, got str 'abc'"):
        load_config(Root, write(tmp_path, '[train]\nseed = "abc"\n'))
    with pytest.raises(ConfigError, match=r"^train\.seed: expected int, got bool"):
        load_config(Root, write(tmp_path, "[train]\nseed = true\n"))
    with pytest.raises(ConfigError, match=r"^optim: is a section"):
        load_config(Root, write(tmp_path, "optim = 3\n"))
    with pytest.raises(ConfigError, match=r"^eval\.shards\[1\]: expected str"):
        load_config(Root, write(tmp_path, '[eval]\nshards = ["a", 2]\n'))
    assert load_config(Root, write(tmp_path, "[optim]\nlr = 1\n")).optim.lr == 1.0  # int -> float


def test_impossible_values_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be > 0, got -1\.0$"):
        load_config(Root, "", ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"^train\.grad_accum: must be >= 1, got 0$"):
        load_config(Root, write(tmp_path, "[train]\ngrad_accum = 0\n"))
    with pytest.raises(ConfigError, match=r"^optim\.warmup: 500 exceeds optim\.iterations 100"):
        load_config(Root, "", ["optim.warmup=500"])  # root validate() hook


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_nonfinite_floats_are_rejected_naming_the_key(text: str, tmp_path: Path) -> None:
    # nan passes every `>= 0` / `> 0` check (all comparisons are False) and inf is "positive".
    with pytest.raises(ConfigError, match=r"^optim\.lr: .*finite"):
        load_config(Root, "", [f"optim.lr={text}"])
    toml_value = {"nan": "nan", "inf": "inf", "-inf": "-inf", "NaN": "nan", "Infinity": "inf"}[text]
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be a finite number"):
        load_config(Root, write(tmp_path, f"[optim]\nlr = {toml_value}\n"))


def test_every_float_setting_of_the_real_presets_rejects_nan() -> None:
    from trainer.presets import PRESETS as REAL, Config

    floats = [k for k, kind in config_keys(REAL["tiny_cpu"]()).items() if "float" in str(kind)]
    assert "optim.lr" in floats and "train.grad_clip" in floats
    for key in floats:
        kind = config_keys(REAL["tiny_cpu"]())[key]
        value = "nan" if kind == "float" else ",".join(["nan"] * kind.count("float"))  # tuples of floats
        with pytest.raises(ConfigError, match="^" + re.escape(key) + r"(\[0\])?: .*finite"):
            load_config(Config, "tiny_cpu", [f"{key}={value}", "data.shards=x.tar"], REAL)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(Root, "huge", [], PRESETS)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Root, str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(Root, write(tmp_path, "[train\n"))
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(Root, write(tmp_path, 'preset = "huge"\n'), [], PRESETS)


def test_dump_toml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(Root, "small", [
        "optim.tag=none", "optim.clip=0.5", 'train.run_dir=gs://b/r "q"\\x', "eval.shards=",
        "optim.lr=1e-7",
    ], PRESETS)
    text = dump_toml(cfg, header="resolved config")
    assert text.startswith("# resolved config\n")
    assert load_config(Root, write(tmp_path, text)) == cfg
    assert from_dict(Root, to_dict(cfg)) == cfg


def test_memory_url_config_file() -> None:
    from trainer.storage import open_url

    with open_url("memory://cfgs/run.toml", "wb") as f:
        f.write(b"[train]\nseed = 7\n")
    assert load_config(Root, "memory://cfgs/run.toml").train.seed == 7


def test_config_keys_lists_dotted_leaves() -> None:
    keys = config_keys(Root())
    assert keys["optim.lr"] == "float"
    assert keys["model.inner.depth"] == "int"
    assert "train" not in keys and "checkpoint.url" in keys


def test_checkpoint_url_defaults_under_run_dir() -> None:
    assert CheckpointConfig().resolve_url("gs://b/run/") == "gs://b/run/checkpoints"
    assert CheckpointConfig(url="s3://x/c").resolve_url("gs://b/run") == "s3://x/c"


def test_cli_helper_exits_2_with_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_from_cli(Root, ["--set", "optim.lr=0.1"], PRESETS).optim.lr == 0.1
    with pytest.raises(SystemExit) as exc:
        config_from_cli(Root, ["--config", "small", "--set", "optim.lr=-2"], PRESETS)
    assert exc.value.code == EXIT_CONFIG_ERROR == 2
    assert "optim.lr: must be > 0, got -2.0" in capsys.readouterr().err


def test_cli_exit_status_in_a_real_process() -> None:
    code = ("from trainer.config import TrainConfig, config_from_cli\n"
            "config_from_cli(TrainConfig, ['--set', 'grad_accum=0'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "grad_accum: must be >= 1, got 0" in proc.stderr


# ---------------------------------------------------------------- the real root and presets


def test_presets_resolve_and_round_trip(tmp_path: Path) -> None:
    from trainer.presets import PRESETS, Config

    for name in PRESETS:
        cfg = load_config(Config, name, ["data.shards=gs://b/sa_*.tar", "model.encoder_init=random"], PRESETS)
        assert cfg.model.variant == ("tiny" if name == "tiny_cpu" else name)
        assert load_config(Config, write(tmp_path, dump_toml(cfg)), [], PRESETS) == cfg


def test_root_cross_section_checks() -> None:
    from trainer.presets import PRESETS, Config

    with pytest.raises(ConfigError, match=r"^data\.shards: required"):
        load_config(Config, "vit_b", [], PRESETS)
    with pytest.raises(ConfigError, match=r"^data\.img_size: 1024 does not match model\.variant 'tiny'"):
        load_config(Config, "tiny_cpu", ["data.shards=x.tar", "data.img_size=1024"], PRESETS)
    with pytest.raises(ConfigError, match=r"^checkpoint\.every: 500 exceeds optim\.max_iters 300"):
        load_config(Config, "tiny_cpu", ["data.shards=x.tar", "checkpoint.every=500"], PRESETS)


def test_other_sections_errors_are_dotted() -> None:
    from trainer.presets import PRESETS, Config

    base = ["data.shards=x.tar"]
    with pytest.raises(ConfigError, match=r"^data\.batch_size: must be positive, got 0"):
        load_config(Config, "tiny_cpu", [*base, "data.batch_size=0"], PRESETS)  # "DataConfig.x:"
    with pytest.raises(ConfigError, match=r"^optim\.lr must be >= 0, got -1\.0"):
        load_config(Config, "tiny_cpu", [*base, "optim.lr=-1"], PRESETS)  # already dotted
    with pytest.raises(ConfigError, match=r"^model\.variant: unknown 'vit_q'"):
        load_config(Config, "tiny_cpu", [*base, "model.variant=vit_q"], PRESETS)
