"""``training.config``'s JSON schema (values.schema.json) is the trainer's config, checked at install.

The schema is generated from the trainer's own config tree by ``tests/k8s/config_schema.py``
(review finding 9 of issue 9): these tests keep the committed file in sync with the trainer,
check that a wrong key or type fails at render time naming the key, and that every value the
trainer's presets hold passes the schema and loads back unchanged.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

from tests.k8s import config_schema as gen
from tests.k8s import render as r
from tests.k8s.render import RenderError, deep_merge, render

BASE: dict = {"training": {"dataShards": "gs://bucket/sa1b/sa_*.tar", "runDir": "gs://bucket/runs/test"}}


def _schema_properties() -> dict[str, Any]:
    schema = json.loads(gen.SCHEMA_PATH.read_text())
    return schema["properties"]["training"]["properties"]["config"]["properties"]


def test_committed_schema_is_in_sync_with_the_trainers_config() -> None:
    text = gen.SCHEMA_PATH.read_text()
    assert gen.generate(text) == text, f"values.schema.json is stale: run `{gen.COMMAND}`"


def test_check_mode_reports_a_stale_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    stale = json.loads(gen.SCHEMA_PATH.read_text())
    del stale["properties"]["training"]["properties"]["config"]["properties"]["optim"]["properties"]["lr"]
    copy = tmp_path / "values.schema.json"
    copy.write_text(json.dumps(stale, indent=2) + "\n")
    monkeypatch.setattr(gen, "SCHEMA_PATH", copy)
    monkeypatch.setattr(gen, "REPO_ROOT", tmp_path)
    assert gen.main(["--check"]) == 1 and gen.COMMAND in capsys.readouterr().err
    assert gen.main(["--write"]) == 0
    assert gen.main(["--check"]) == 0
    fixed = json.loads(copy.read_text())["properties"]["training"]["properties"]["config"]
    assert "lr" in fixed["properties"]["optim"]["properties"]


def test_every_trainer_key_is_in_the_schema_with_its_doc() -> None:
    from trainer.config import config_keys
    from trainer.config_docs import field_docs
    from trainer.presets import Config

    cfg, properties = Config(), _schema_properties()
    keys = config_keys(cfg)
    for dotted in keys:
        section, key = dotted.split(".", 1)
        entry = properties[section]["properties"][key]
        doc = field_docs(type(getattr(cfg, section)))[key]
        assert doc and entry["description"].endswith(doc), dotted
    # Nothing else, and every table closed.
    assert {f"{s}.{k}" for s, node in properties.items() for k in node["properties"]} == set(keys)
    assert all(node["additionalProperties"] is False for node in properties.values())


#: Finding 9: bad training.config -> the JSON pointer Helm's message must name.
BAD_CONFIG = {
    "misspelt-key": ({"optim": {"lrr": 1e-4}}, ["'/training/config/optim'", "'lrr'"]),
    "int-as-word": ({"optim": {"max_iters": "many"}}, ["'/training/config/optim/max_iters'"]),
    "int-as-string": ({"data": {"batch_size": "2"}}, ["'/training/config/data/batch_size'"]),
    "nested-table": ({"data": {"x": {"y": 1}}}, ["'/training/config/data'", "'x'"]),
    "float-for-int": ({"train": {"grad_accum": 1.5}}, ["'/training/config/train/grad_accum'"]),
    "bool-for-int": ({"eval": {"every": True}}, ["'/training/config/eval/every'"]),
    "literal-outside-set": ({"train": {"amp": "fp16"}}, ["'/training/config/train/amp'"]),
    "yaml-off-unquoted": ({"checkpoint": {"resume": False}}, ["'/training/config/checkpoint/resume'"]),
    "string-for-list": ({"eval": {"shards": "gs://b/val.tar"}}, ["'/training/config/eval/shards'"]),
    "list-item-type": ({"optim": {"milestones": [100, "200"]}}, ["'/training/config/optim/milestones/1'"]),
    "fixed-tuple-length": ({"optim": {"betas": [0.9, 0.99, 0.999]}}, ["'/training/config/optim/betas'"]),
    "unknown-section": ({"optimizer": {"lr": 1e-4}}, ["'/training/config'", "'optimizer'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG))
def test_bad_config_fails_at_install_naming_the_key(case: str) -> None:
    config, words = BAD_CONFIG[case]
    with pytest.raises(RenderError) as info:
        render(deep_merge(BASE, {"training": {"config": config}}))
    assert info.value.stage == "values", str(info.value)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_chart_owned_keys_keep_their_own_message() -> None:
    # The schema leaves them untyped, so the template names the chart value to use instead.
    with pytest.raises(RenderError) as info:
        render(deep_merge(BASE, {"training": {"config": {"metrics": {"port": "x"}}}}))
    assert info.value.stage == "template" and "monitoring.port" in str(info.value)


@pytest.mark.parametrize("preset", ["tiny_cpu", "vit_b", "vit_l", "vit_h"])
def test_every_preset_value_passes_the_schema_and_loads_back(preset: str, tmp_path: Path) -> None:
    """The whole resolved config of each trainer preset as training.config: the schema admits
    every real value (ints for floats, tuples as lists, empty lists and strings)."""
    from trainer.config import load_config, to_dict
    from trainer.presets import PRESETS, Config

    want = to_dict(PRESETS[preset]())
    config = {section: {k: v for k, v in keys.items() if (section, k) not in gen.CHART_OWNED}
              for section, keys in want.items()}
    config["model"]["encoder_init"] = "random"  # the paper presets' placeholder is refused by the trainer
    values = deep_merge(BASE, {"training": {"preset": preset, "config": config}, "gpusPerNode": 0})
    objects = render(values)
    configmap = [o for o in r.of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config")][0]
    path = tmp_path / "config.toml"
    path.write_text(configmap["data"]["config.toml"])
    got = to_dict(load_config(Config, str(path), (), PRESETS))
    for section, keys in config.items():
        for key, value in keys.items():
            assert got[section][key] == value, (f"{section}.{key}", got[section][key], value)


@pytest.mark.parametrize("tp, schema", [
    (int, {"type": "integer"}),
    (float, {"type": "number"}),
    (bool, {"type": "boolean"}),
    (Optional[int], {"type": ["integer", "null"]}),
    (int | None, {"type": ["integer", "null"]}),
    (Literal["a", "b"], {"type": "string", "enum": ["a", "b"]}),
    (Optional[Literal["a"]], {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "null"}]}),
    (tuple[int, ...], {"type": "array", "items": {"type": "integer"}}),
    (list[str], {"type": "array", "items": {"type": "string"}}),
    (tuple[float, float], {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}),
    (tuple[int, str], {"type": "array", "items": [{"type": "integer"}, {"type": "string"}],
                       "additionalItems": False, "minItems": 2, "maxItems": 2}),
    (str | list[str], {"type": ["string", "array"], "items": {"type": "string"}}),
    (typing.Union[int, float], {"type": ["integer", "number"]}),
])
def test_type_mapping(tp: Any, schema: dict) -> None:
    assert gen.type_schema(tp, "x.y") == schema


def test_an_unknown_type_names_the_key() -> None:
    with pytest.raises(gen.SchemaError, match="x.y"):
        gen.type_schema(dict[str, int], "x.y")
