"""Render the ``charts/sam-train`` Helm chart offline with the real Helm library.

``helm-python-sdk`` ships Helm v4's Go library; its ``Chart.render`` wrapper does not expose
the capabilities (kube version, API versions), so :func:`render_templates` makes the same
native call with them (/work/shared/TOOLING.md, "Helm without a helm binary"). Without the
API versions a template guarded by ``.Capabilities.APIVersions.Has`` would render nothing and
its tests would pass vacuously.

Failures of the values schema (``values.schema.json``) and of templates (``fail``,
``required``, strict missing keys) both raise :class:`RenderError` carrying Helm's message,
so tests can assert that the offending key is named. The native call itself raises
``helm_python.HelmValuesError`` (code -22; ``detail`` like ``- at '/nodes': minimum: got 0,
want 1``) or ``HelmRenderError`` (code -23; ``execution error at (tpl:line:col): <fail
message>``); an unknown render option raises ``HelmInvalidArgError``.
"""

from __future__ import annotations

import copy
import functools
import json
import types
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from tests.conftest import unavailable
from trainer.launch.setvalues import deep_merge  # Helm's -f merge, shared with the builder

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "sam-train"
PRESETS_DIR = CHART_DIR / "presets"

#: API groups the cluster is assumed to serve, both as ``group/version`` and
#: ``group/version/Kind`` (``.Capabilities.APIVersions.Has`` accepts either form).
DEFAULT_API_VERSIONS: tuple[str, ...] = (
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
    "kubeflow.org/v1",
    "kubeflow.org/v1/PyTorchJob",
    "trainer.kubeflow.org/v1alpha1",
    "trainer.kubeflow.org/v1alpha1/TrainJob",
    "trainer.kubeflow.org/v1alpha1/TrainingRuntime",
    "trainer.kubeflow.org/v1alpha1/ClusterTrainingRuntime",
)
DEFAULT_KUBE_VERSION = "v1.31.0"
#: libyaml's safe loader where PyYAML has it (the dashboard alone is 40 kB of YAML per render).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: Lint severities (helm_python.lint): 1 info, 2 warning, 3 error.
LINT_ERROR = 3


class RenderError(Exception):
    """Helm refused the values (schema) or a template failed; ``str()`` is Helm's message.

    Attributes:
        stage: ``"values"`` (values.schema.json), ``"template"`` (fail/required/strict) or
            ``"install"`` (:func:`install_dry_run`).
        message: Helm's message as it would print it.
    """

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message


def helm() -> types.ModuleType:
    """``helm_python``, or skip the test (fail under CI, where ``make test`` installs it)."""
    try:
        import helm_python
    except ImportError as err:
        unavailable(f"needs helm_python (the test extras install helm-python-sdk==0.2.2): {err}")
    return helm_python


@functools.lru_cache(maxsize=4)
def _chart(path: str) -> Any:
    """The loaded chart, kept for the whole test session (loading reads every file)."""
    return helm().Chart.load(path)


def render_templates(
    values: Mapping[str, Any],
    name: str = "rel",
    namespace: str = "ml",
    kube_version: str = DEFAULT_KUBE_VERSION,
    api_versions: Iterable[str] = DEFAULT_API_VERSIONS,
    chart_dir: Path = CHART_DIR,
) -> dict[str, str]:
    """Every rendered template as ``{"sam-train/templates/x.yaml": text}`` (partials excluded).

    Raises:
        RenderError: the values fail the schema or a template fails.
    """
    # strict: a template reading a value that does not exist fails (Go's missingkey=error),
    # instead of rendering "<no value>".
    options = {"name": name, "namespace": namespace, "kube_version": kube_version,
               "api_versions": list(api_versions), "strict": True}
    return dict(_render_json(str(chart_dir), json.dumps(dict(values), sort_keys=True),
                             json.dumps(options, sort_keys=True)))


@functools.lru_cache(maxsize=512)
def _render_json(chart_dir: str, values_json: str, options_json: str) -> tuple[tuple[str, str], ...]:
    """One native render, cached: several tests look at the same render (the output is immutable)."""
    helm_python = helm()
    try:
        out = helm_python._native.call_string("helm_render", _chart(chart_dir)._raw(), values_json, options_json)
    except helm_python.HelmValuesError as err:
        raise RenderError("values", err.detail) from err
    except helm_python.HelmRenderError as err:
        raise RenderError("template", err.detail) from err
    return tuple(json.loads(out).items())


def render(
    values: Mapping[str, Any],
    name: str = "rel",
    namespace: str = "ml",
    kube_version: str = DEFAULT_KUBE_VERSION,
    api_versions: Iterable[str] = DEFAULT_API_VERSIONS,
) -> list[dict]:
    """All objects of all templates (NOTES.txt excluded), in template-path order."""
    manifests = render_templates(values, name, namespace, kube_version, api_versions)
    objects: list[dict] = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.load_all(manifests[path], Loader=_YAML_LOADER):
            if doc is not None:  # an empty template or a `---` between conditionals
                objects.append(doc)
    return objects


def notes(
    values: Mapping[str, Any],
    name: str = "rel",
    namespace: str = "ml",
    kube_version: str = DEFAULT_KUBE_VERSION,
    api_versions: Iterable[str] = DEFAULT_API_VERSIONS,
) -> str:
    """The rendered NOTES.txt (what ``helm install`` prints)."""
    manifests = render_templates(values, name, namespace, kube_version, api_versions)
    found = [text for path, text in manifests.items() if path.endswith("templates/NOTES.txt")]
    if not found:
        raise AssertionError("the chart has no templates/NOTES.txt")
    return found[0]


def install_dry_run(values: Mapping[str, Any], name: str = "rel", namespace: str = "ml") -> dict:
    """``helm install --dry-run=client``: the release Helm would create (``manifest``, ``notes``).

    The whole install path (Chart.yaml's kubeVersion against Helm's default capabilities, hooks,
    the manifest stream of ``helm template``), with an in-memory release store.
    """
    helm_python = helm()
    try:
        return helm_python.Config(storage_driver="memory").install(
            str(CHART_DIR), name, dict(values), namespace=namespace, dry_run="client")
    except (helm_python.HelmValuesError, helm_python.HelmRenderError, helm_python.HelmReleaseError) as err:
        raise RenderError("install", err.detail) from err


def lint(values: Mapping[str, Any], kube_version: str = DEFAULT_KUBE_VERSION) -> dict:
    """``helm lint --strict`` of the chart with ``values``: ``{"messages", "errors"}``."""
    return helm().lint(str(CHART_DIR), dict(values), strict=True, kube_version=kube_version)


def lint_errors(report: Mapping[str, Any]) -> list[str]:
    """The error-level messages of a lint report, as ``path: message``."""
    return [f"{m.get('path')}: {m.get('error')}" for m in report.get("messages", [])
            if m.get("severity", 0) >= LINT_ERROR] + [str(e) for e in report.get("errors") or []]


def preset_names() -> list[str]:
    """The preset values files shipped with the chart (``presets/<name>.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    """``charts/sam-train/presets/<name>.yaml`` as a dict, parsed by Helm's own values parser.

    That is what ``helm install -f`` passes; PyYAML reads some scalars differently (Helm's YAML
    turns a key ``y`` into ``"true"``), so a preset relying on either reading is tested as Helm sees it.
    """
    return helm().values_from_yaml((PRESETS_DIR / f"{name}.yaml").read_text()) or {}


def chart_defaults() -> dict:
    """The chart's ``values.yaml`` (a fresh copy)."""
    return copy.deepcopy(_chart_defaults())


@functools.lru_cache(maxsize=1)
def _chart_defaults() -> dict:
    return yaml.load((CHART_DIR / "values.yaml").read_text(), Loader=_YAML_LOADER) or {}


def effective_values(*layers: Mapping[str, Any]) -> dict:
    """What the templates see: ``values.yaml`` with ``layers`` merged over it."""
    return deep_merge(chart_defaults(), *layers)


# --------------------------------------------------------------------------- looking at objects


def of_kind(objects: Iterable[Mapping[str, Any]], kind: str) -> list[dict]:
    """The objects of ``kind``."""
    return [dict(o) for o in objects if o.get("kind") == kind]


def one(objects: Iterable[Mapping[str, Any]], kind: str) -> dict:
    """The single object of ``kind`` (an AssertionError naming what was found otherwise)."""
    objects = list(objects)
    found = of_kind(objects, kind)
    if len(found) != 1:
        raise AssertionError(f"expected exactly one {kind}, found {len(found)} "
                             f"among {[o.get('kind') for o in objects]}")
    return found[0]


def job_of(objects: Iterable[Mapping[str, Any]]) -> dict:
    """The training job: the one PyTorchJob or TrainJob."""
    jobs = [dict(o) for o in objects if o.get("kind") in ("PyTorchJob", "TrainJob")]
    if len(jobs) != 1:
        raise AssertionError(f"expected one PyTorchJob or TrainJob, found {[o.get('kind') for o in jobs]}")
    return jobs[0]


def named(items: Iterable[Mapping[str, Any]] | None, name: str) -> list[dict]:
    """The entries of a list of named things (containers, volumes, env) called ``name``."""
    return [dict(i) for i in items or () if i.get("name") == name]


def pytorchjob_templates(job: Mapping[str, Any]) -> dict[str, dict]:
    """``{replica type: pod template}`` of a PyTorchJob."""
    return {rtype: spec["template"] for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items()}


def trainjob_patch_templates(job: Mapping[str, Any]) -> dict[str, dict]:
    """``{replicatedJob name: pod template}`` of a TrainJob's runtimePatches (merged over patches)."""
    out: dict[str, dict] = {}
    for patch in job["spec"].get("runtimePatches") or ():
        spec = (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {})
        for rjob in spec.get("replicatedJobs") or ():
            template = ((rjob.get("template") or {}).get("spec") or {}).get("template")
            if template is not None:
                out[rjob["name"]] = deep_merge(out.get(rjob["name"], {}), template)
    return out


def runtime_pod_templates(runtime: Mapping[str, Any]) -> dict[str, dict]:
    """``{replicatedJob name: pod template}`` of a (Cluster)TrainingRuntime's JobSet template."""
    return {rjob["name"]: rjob["template"]["spec"]["template"]
            for rjob in runtime["spec"]["template"]["spec"]["replicatedJobs"]}


#: Pod-level fields compared between the job shapes.
POD_FIELDS = ("serviceAccountName", "nodeSelector", "tolerations", "affinity", "volumes", "securityContext",
              "schedulerName", "priorityClassName", "imagePullSecrets", "terminationGracePeriodSeconds")


def pod_view(job: Mapping[str, Any]) -> dict[str, Any]:
    """What a training pod gets, from either job shape, in one flat dict for comparison.

    Keys: ``image``, ``command`` (command + args), ``env`` (by name), ``resources``, ``ports``,
    ``volumeMounts``, ``containerSecurityContext``, ``labels``, ``annotations`` and the pod fields
    of :data:`POD_FIELDS` (missing fields are None). A PyTorchJob's replicas must all agree
    (AssertionError otherwise); a TrainJob's container settings come from ``spec.trainer``
    and the ``node`` container of its runtime patch.
    """
    if job["kind"] == "PyTorchJob":
        views = [_template_view(t, "pytorch") for t in pytorchjob_templates(job).values()]
        for other in views[1:]:
            if other != views[0]:
                raise AssertionError("PyTorchJob replica templates differ")
        return views[0]
    patch = trainjob_patch_templates(job).get("node", {})
    view = _template_view(patch, "node")
    trainer = job["spec"]["trainer"]
    view["image"] = trainer.get("image")
    view["command"] = list(trainer.get("command") or []) + list(trainer.get("args") or [])
    view["env"] = {**{e["name"]: e for e in trainer.get("env") or ()}, **view["env"]}
    view["resources"] = trainer.get("resourcesPerNode")
    return view


def _template_view(template: Mapping[str, Any], container_name: str) -> dict[str, Any]:
    spec = template.get("spec") or {}
    containers = named(spec.get("containers"), container_name)
    if len(containers) > 1:
        raise AssertionError(f"{len(containers)} containers named {container_name!r}")
    container = containers[0] if containers else {}
    meta = template.get("metadata") or {}
    view: dict[str, Any] = {field: spec.get(field) for field in POD_FIELDS}
    view.update(
        image=container.get("image"),
        command=list(container.get("command") or []) + list(container.get("args") or []),
        env={e["name"]: e for e in container.get("env") or ()},
        resources=container.get("resources"),
        ports=container.get("ports"),
        volumeMounts=container.get("volumeMounts"),
        containerSecurityContext=container.get("securityContext"),
        labels=meta.get("labels") or {},
        annotations=meta.get("annotations") or {},
    )
    return view
