"""``trainer.launch.spec.JobSpec`` mirrors the chart's values: same keys, defaults, checks, merging.

- defaults: ``JobSpec(name=...).to_values()`` is ``charts/sam-train/values.yaml``, and its key tree is
  values.schema.json's properties (nothing missing, nothing extra);
- checks: every constraint of values.schema.json (type, enum, minimum/maximum, exclusiveMinimum,
  pattern, min/maxLength, unknown keys, patternProperties, propertyNames, items, uniqueItems) is
  turned into bad values, generated from the schema file itself; each must be refused by Helm
  (schema stage) *and* by ``JobSpec.from_values`` with a SpecError naming the dotted key. The
  boundary values (minimum, maximum, every enum member) must pass both;
- the bad values of tests/unit/test_chart_values.py (BAD_VALUES, POD_MISTAKES) fail here too;
- merging like Helm: maps key by key, ``null`` removes a default key, lists replaced; ``-f`` files
  in order; ``--set`` parsed like Helm's own parser (helm_python.parse_set_string);
- the fullname rule gives the chart's object names.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.k8s import render as r
from tests.k8s.render import RenderError, deep_merge, job_of, render
from tests.unit.test_chart_values import BAD_VALUES, POD_MISTAKES
from trainer.launch import build_objects
from trainer.launch.setvalues import parse_set, typed_value
from trainer.launch.spec import JobSpec, SpecError

BASE: dict = {"training": {"dataShards": "gs://bucket/sa1b/sa_*.tar", "runDir": "gs://bucket/runs/test"}}
SCHEMA: dict = json.loads((r.CHART_DIR / "values.schema.json").read_text())


# --------------------------------------------------------------------------- defaults and key tree


def test_defaults_are_the_charts_values_yaml() -> None:
    values_yaml = yaml.safe_load((r.CHART_DIR / "values.yaml").read_text())
    assert JobSpec(name="rel").to_values() == values_yaml


def _closed(schema: dict) -> bool:
    """A section with named keys only (resources.requests has a key pattern instead)."""
    return schema.get("additionalProperties") is False and "properties" in schema


def _schema_keys(schema: dict, prefix: str = "") -> set[str]:
    """Dotted keys of the schema's closed sections (free-form objects are leaves)."""
    out = set()
    for key, sub in (schema.get("properties") or {}).items():
        dotted = f"{prefix}{key}"
        out.add(dotted)
        if _closed(sub) and key != "config":  # training.config: free-form tables
            out |= _schema_keys(sub, dotted + ".")
    return out


def _value_keys(values: dict, schema: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        out.add(dotted)
        sub = (schema.get("properties") or {}).get(key, {})
        if isinstance(value, dict) and _closed(sub) and key != "config":
            out |= _value_keys(value, sub, dotted + ".")
    return out


def test_every_schema_value_is_a_field_and_no_more() -> None:
    spec_keys = _value_keys(JobSpec(name="rel").to_values(), SCHEMA)
    assert spec_keys == _schema_keys(SCHEMA) - {"global"}


def test_fields_are_snake_case_of_the_chart_keys() -> None:
    spec = JobSpec.from_values(deep_merge(BASE, {"gpusPerNode": 4, "nodePool": {"preset": "eks-p5"},
                                                 "scheduling": {"gang": "volcano"}, "monitoring": {"port": 9500}}),
                               "rel", "ml")
    assert (spec.gpus_per_node, spec.node_pool.preset, spec.scheduling.gang, spec.monitoring.port) == (
        4, "eks-p5", "volcano", 9500)
    assert spec.training.data_shards == BASE["training"]["dataShards"] and spec.namespace == "ml"


def test_round_trip_through_values() -> None:
    values = deep_merge(r.load_preset("vit-h-a100"), BASE, {
        "resources": {"limits": {"memory": None}}, "runPolicy": {"ttlSecondsAfterFinished": 60},
        "podSecurityContext": {"runAsUser": 2000, "fsGroup": None}, "env": [{"name": "A", "value": "1"}]})
    spec = JobSpec.from_values(values, "exp", "team")
    again = JobSpec.from_values(spec.to_values(), "exp", "team")
    assert again == spec
    assert "memory" not in spec.resources.limits and spec.to_values()["resources"]["limits"] == {"memory": None}
    assert spec.pod_security_context["runAsUser"] == 2000 and "fsGroup" not in spec.pod_security_context
    assert spec.pod_security_context["seccompProfile"] == {"type": "RuntimeDefault"}  # merged, not replaced


# --------------------------------------------------------------------------- schema cases


def _set_at(path: list[str], value: Any) -> dict:
    out: Any = value
    for key in reversed(path):
        out = {key: out}
    return out


def _dotted(path: list[str]) -> str:
    return ".".join(path)


def _bad_for_type(types: list[str]) -> list[Any]:
    """Values of none of ``types`` (JSON Schema names)."""
    candidates = {"string": "x", "integer": 7, "number": 1.5, "boolean": True, "object": {"a": "b"}, "array": ["x"]}
    out = []
    for name, value in candidates.items():
        accepted = name in types or (name == "integer" and "number" in types)
        if not accepted:
            out.append(value)
    return out


def _nonmatching(pattern: str, max_length: int | None) -> str | None:
    """A string the schema's ``pattern`` rejects (None when the probes all match)."""
    for probe in ("Not Valid!", "-bad-", "x y", "UPPER", "bad\tvalue"):
        if not re.search(pattern, probe) and (max_length is None or len(probe) <= max_length):
            return probe
    return None


def schema_cases(schema: dict, path: list[str]) -> Iterator[tuple[str, list[str], Any, bool]]:
    """(case id, path, value, whether valid) for every constraint of the schema below ``path``."""
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    where = _dotted(path) or "values"
    if types and path:
        for value in _bad_for_type(types):
            yield f"{where}-type-{type(value).__name__}", path, value, False
    if "enum" in schema:
        yield f"{where}-enum", path, "not-a-member", False
        for member in schema["enum"]:
            yield f"{where}-enum-ok-{member}", path, member, True
    for bound, delta, valid in (("minimum", -1, False), ("maximum", 1, False), ("minimum", 0, True),
                                ("maximum", 0, True)):
        if bound in schema:
            bad = schema[bound] + delta
            yield f"{where}-{bound}{'-ok' if valid else ''}", path, bad, valid
    if "exclusiveMinimum" in schema:
        yield f"{where}-exclusiveMinimum", path, schema["exclusiveMinimum"], False
    if "pattern" in schema and "string" in types:
        bad = _nonmatching(schema["pattern"], schema.get("maxLength"))
        assert bad is not None, f"no probe breaks the pattern of {where}"
        yield f"{where}-pattern", path, bad, False
    if "maxLength" in schema:
        yield f"{where}-maxLength", path, "a" * (schema["maxLength"] + 1), False
    if schema.get("minLength", 0) >= 1:
        yield f"{where}-minLength", path, "", False
    if schema.get("additionalProperties") is False:
        yield f"{where}-unknown-key", path + ["bogusKey"], 1, False
    for key_pattern, sub in (schema.get("patternProperties") or {}).items():
        yield f"{where}-bad-name", path + ["gpu"], "1", False
        yield f"{where}-bad-quantity", path + ["cpu"], "lots", False
    if "propertyNames" in schema:
        yield f"{where}-bad-property-name", path + ["1-not-a-name"], "x", False
    if isinstance(schema.get("additionalProperties"), dict) and "type" in schema["additionalProperties"]:
        yield f"{where}-bad-item-type", path + ["k"], None, False
    if "minItems" in schema:
        yield f"{where}-minItems", path, [1] * (schema["minItems"] - 1), False
    if "maxItems" in schema:
        yield f"{where}-maxItems", path, [1] * (schema["maxItems"] + 1), False
    items = schema.get("items")
    if isinstance(items, dict):
        yield from _item_cases(items, path, where)
        if schema.get("uniqueItems") and items.get("enum"):
            yield f"{where}-unique", path, [items["enum"][0]] * 2, False
    for key, sub in (schema.get("properties") or {}).items():
        if key == "global":
            continue
        yield from schema_cases(sub, path + [key])


def _item_cases(items: dict, path: list[str], where: str) -> Iterator[tuple[str, list[str], Any, bool]]:
    if items.get("type") == "object":
        yield f"{where}-item-not-object", path, ["x"], False
        if items.get("required"):
            yield f"{where}-item-missing-required", path, [{"other": "x"}], False
    if items.get("type") == "string":
        yield f"{where}-item-not-string", path, [5], False
        if "pattern" in items:
            yield f"{where}-item-pattern", path, ["Not Valid!"], False
        if "enum" in items:
            yield f"{where}-item-enum", path, ["not-a-member"], False
    if items.get("type") in ("number", "integer", "boolean"):
        yield f"{where}-item-wrong-type", path, ["x"], False
    if "anyOf" in items:
        yield f"{where}-item-none-of", path, [5], False


SCHEMA_CASES = {case_id: (path, value, valid) for case_id, path, value, valid in schema_cases(SCHEMA, [])}


def test_schema_cases_cover_the_schema() -> None:
    # The generator found every kind of constraint the schema uses (a silent gap would hide a check).
    ids = " ".join(SCHEMA_CASES)
    for needle in ("nodes-minimum", "gpusPerNode-maximum", "jobKind-enum", "shmSize-pattern",
                   "monitoring.prometheusRule.throughputDropRatio-exclusiveMinimum", "fullnameOverride-maxLength",
                   "trainJob.runtime-minLength", "monitoring-unknown-key", "resources.requests-bad-name",
                   "nccl.extraEnv-bad-property-name", "monitoring.prometheusRule.disabled-unique",
                   "training.extraArgs-item-pattern", "env-item-missing-required", "image.pullSecrets-item-none-of",
                   "serviceAccount.gcpServiceAccount-pattern", "podLabels-bad-item-type",
                   "training.config.optim.betas-maxItems", "training.config.data.lsj_scale-item-wrong-type",
                   "training.config.train.amp-enum", "training.config.optim-unknown-key",
                   "training.config.data.batch_size-type-float", "training.rendezvousTimeoutSeconds-minimum"):
        assert needle in ids, needle
    assert len(SCHEMA_CASES) > 150


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_case_is_judged_alike_by_helm_and_jobspec(case: str) -> None:
    path, value, valid = SCHEMA_CASES[case]
    values = deep_merge(BASE, _set_at(path, value))
    try:
        render(values)
        helm_stage = None
    except RenderError as err:
        helm_stage = err.stage
    if valid:
        assert helm_stage != "values", f"Helm's schema refuses a valid value for {_dotted(path)}: {value!r}"
        JobSpec.from_values(values, "rel", "ml")
        return
    assert helm_stage == "values", f"Helm's schema accepts {value!r} for {_dotted(path)} (stage {helm_stage})"
    with pytest.raises(SpecError) as info:
        JobSpec.from_values(values, "rel", "ml")
    assert str(info.value).startswith(_dotted(path)), (_dotted(path), str(info.value))


# --------------------------------------------------------------------------- the chart tests' bad values


def _words_as_keys(words: list[str]) -> list[str]:
    """Helm's JSON pointers (``'/nodePool/preset'``) as the dotted keys a SpecError names."""
    return [w.strip("'").strip("/").replace("/", ".") for w in words]


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_chart_bad_values_raise_spec_errors_naming_the_key(case: str) -> None:
    override, words, stage = BAD_VALUES[case]
    values = deep_merge(BASE, override)
    with pytest.raises(SpecError) as info:
        if stage == "values":
            JobSpec.from_values(values, "rel", "ml")  # values.schema.json's checks come with the spec
        else:
            build_objects(JobSpec.from_values(values, "rel", "ml"))  # the templates' come with the objects
    for word in _words_as_keys(words):
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("case", sorted(POD_MISTAKES))
def test_chart_pod_mistakes_raise_spec_errors(case: str) -> None:
    override, words = POD_MISTAKES[case]
    with pytest.raises(SpecError) as info:
        build_objects(JobSpec.from_values(deep_merge(BASE, override), "rel", "ml"))
    assert all(word in str(info.value) for word in words), str(info.value)


def test_type_errors_name_the_key_and_the_value() -> None:
    with pytest.raises(SpecError, match=r"^gpusPerNode: expected an integer, got 'eight'$"):
        JobSpec.from_values({"gpusPerNode": "eight"}, "rel")
    with pytest.raises(SpecError, match=r"^training\.config\.train\.amp: expected one of 'auto', 'bf16', 'off', got false \(quote it"):
        JobSpec.from_values({"training": {"config": {"train": {"amp": False}}}}, "rel")
    with pytest.raises(SpecError, match=r"^nodez: unknown key .*did you mean 'nodes'"):
        JobSpec.from_values({"nodez": 2}, "rel")
    with pytest.raises(SpecError, match=r"^scheduling: expected a mapping, got 'volcano'"):
        JobSpec.from_values({"scheduling": "volcano"}, "rel")


@pytest.mark.parametrize("name", ["Exp1", "a_b", "-x", "x" * 54, ""])
def test_release_names_helm_refuses_are_refused(name: str) -> None:
    with pytest.raises(SpecError, match="release name"):
        JobSpec.from_values(BASE, name)


def test_whole_floats_count_as_integers_like_json_schema() -> None:
    spec = JobSpec.from_values({"nodes": 2.0}, "rel")
    assert spec.nodes == 2 and type(spec.nodes) is int
    render(deep_merge(BASE, {"nodes": 2.0}))  # Helm agrees


def test_nullable_values_take_null_and_others_refuse_it() -> None:
    spec = JobSpec.from_values({"runPolicy": {"activeDeadlineSeconds": None}}, "rel")
    assert spec.run_policy.active_deadline_seconds is None
    with pytest.raises(SpecError, match=r"^nodes: expected an integer, got null"):
        JobSpec.from_values({"nodes": None}, "rel")


# --------------------------------------------------------------------------- fullname


@pytest.mark.parametrize("name, override, want", [
    ("rel", {}, "rel-sam-train"),
    ("sam-train-exp1", {}, "sam-train-exp1"),
    ("my-sam-train", {}, "my-sam-train"),
    ("experiment-" + "x" * 42, {}, None),
    ("exp", {"fullnameOverride": "vit-h-run"}, "vit-h-run"),
    ("exp", {"nameOverride": "sam"}, "exp-sam"),
    ("samurai", {"nameOverride": "sam"}, "samurai"),
    ("exp", {"nameOverride": "n" * 40}, None),
])
def test_fullname_is_the_charts(name: str, override: dict, want: str | None) -> None:
    values = deep_merge(BASE, override)
    spec = JobSpec.from_values(values, name, "ml")
    if want is None:  # too long: both refuse, with one message (a cut name could collide)
        with pytest.raises(RenderError) as chart:
            render(values, name=name)
        with pytest.raises(SpecError) as ours:
            spec.fullname  # noqa: B018
        assert str(ours.value) in str(chart.value)
        return
    assert spec.fullname == job_of(render(values, name=name))["metadata"]["name"] == want


def test_fullname_that_is_not_a_dns_label_fails_like_the_chart() -> None:
    spec = JobSpec.from_values(BASE, "9lives")  # a valid release name, but Services need a letter first
    with pytest.raises(RenderError) as chart:
        render(BASE, name="9lives")
    with pytest.raises(SpecError) as info:
        spec.fullname  # noqa: B018
    assert str(info.value) in str(chart.value)


# --------------------------------------------------------------------------- -f and --set


SET_EXPRESSIONS = [
    "a=1,b.c=two,ports={80,443}", "x[1].y=08,z=null,t=TRUE,e=", "f=1.5,g=-3,h=+4,i=0,j=007",
    r"esc=a\,b,k\.l=3", "list={}", "name=a=b", "deep.er.key=value,deep.er.other=false",
    "items[0].name=OMP_NUM_THREADS,items[0].value=1", "big=99999999999999999999", "u=null",
]


@pytest.mark.parametrize("expr", SET_EXPRESSIONS)
def test_set_parser_agrees_with_helms(expr: str) -> None:
    helm = r.helm()
    assert parse_set(expr, {}) == helm.parse_set_string(expr)
    assert parse_set(expr, {}, typed=False) == helm.parse_set_string_values(expr)


def test_typed_values() -> None:
    assert [typed_value(t) for t in ("8", "08", "1.5", "true", "False", "null", "0", "-2", "")] == [
        8, "08", "1.5", True, False, None, 0, -2, ""]


def test_set_without_value_is_an_error() -> None:
    with pytest.raises(SpecError, match="has no value"):
        parse_set("nodes=2,gpus", {})


def test_load_is_helm_install_with_files_and_sets(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("nodes: 4\nnodePool:\n  preset: eks-p4de\nenv:\n  - {name: A, value: '1'}\n")
    preset = str(r.PRESETS_DIR / "vit-h-a100.yaml")
    sets = ["training.dataShards=gs://b/sa_*.tar,training.runDir=gs://b/run",
            "training.config.model.mae_checkpoint=gs://b/mae.pth", "gpusPerNode=4"]
    spec = JobSpec.load([preset, str(extra)], sets, name="exp", namespace="team",
                        set_string_values=["podLabels.build=0012"])
    want = deep_merge(r.load_preset("vit-h-a100"), yaml.safe_load(extra.read_text()), {
        "training": {"dataShards": "gs://b/sa_*.tar", "runDir": "gs://b/run",
                     "config": {"model": {"mae_checkpoint": "gs://b/mae.pth"}}},
        "gpusPerNode": 4, "podLabels": {"build": "0012"}})
    assert spec == JobSpec.from_values(want, "exp", "team")
    assert (spec.nodes, spec.gpus_per_node, spec.node_pool.preset) == (4, 4, "eks-p4de")
    assert spec.training.config["data"]["num_workers"] == 8  # from the preset file


def test_load_names_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match="bad.yaml: a values file must hold a mapping"):
        JobSpec.load([str(bad)])
    with pytest.raises(SpecError, match="missing.yaml: cannot read"):
        JobSpec.load([str(tmp_path / "missing.yaml")])


def test_set_null_removes_a_default_key_like_helm() -> None:
    spec = JobSpec.load(set_values=["resources.limits.memory=null", "nodePool.nodeSelector.pool=a"], name="rel")
    assert spec.resources.limits == {} and spec.node_pool.node_selector == {"pool": "a"}


def test_with_values_layers_over_a_spec() -> None:
    spec = JobSpec.from_values(deep_merge(BASE, {"nodes": 2}), "rel")
    more = spec.with_values({"gpusPerNode": 0, "training": {"extraArgs": ["optim.lr=1e-4"]}})
    assert (more.nodes, more.gpus_per_node, more.training.extra_args) == (2, 0, ["optim.lr=1e-4"])
    assert more.training.data_shards == BASE["training"]["dataShards"] and spec.gpus_per_node == 8


def test_hand_edited_spec_is_checked_when_built() -> None:
    spec = JobSpec.from_values(BASE, "rel")
    spec.nodes = "eight"  # type: ignore[assignment]
    with pytest.raises(SpecError, match="^nodes: expected an integer"):
        build_objects(spec)
    spec = copy.deepcopy(JobSpec.from_values(BASE, "rel"))
    spec.training.config = {"optim": {"lrr": 1e-4}}
    with pytest.raises(SpecError, match=r"^training\.config\.optim\.lrr: unknown key"):
        build_objects(spec)
