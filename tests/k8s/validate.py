"""Validate Kubernetes objects as strictly as an API server with kubectl's ``--validate=strict``.

- Core kinds (``v1``, ``apps/v1``, ``rbac.authorization.k8s.io/v1``, ...):
  ``kubernetes_validate.validate(obj, version, strict=True)`` (offline OpenAPI schemas).
- Custom kinds: the ``openAPIV3Schema`` of the matching served version of the upstream CRD in
  ``../shared/crds`` (env ``SAM_SHARED_CRDS`` overrides the folder), with jsonschema made as
  strict as the API server (/work/shared/TOOLING.md, "Schema validation"):

  - every object schema that declares ``properties`` (and neither ``additionalProperties`` nor
    ``x-kubernetes-preserve-unknown-fields``) is closed: kubectl rejects unknown fields;
  - ``metadata`` against ObjectMeta basics (the CRDs only say ``type: object``);
  - Go's ``^(?i)`` (Python's ``re`` rejects a global flag after ``^``) becomes ``(?i)^``;
  - ``x-kubernetes-list-type: map`` keys and ``set`` items are unique;
  - ``x-kubernetes-int-or-string`` fields (quantities, ports) hold an int or a string, never a
    float (``cpu: 1.5`` is rejected by the API server; quote it);
  - ``nullable`` is honoured, a ``null`` elsewhere is an error (a template rendered an unset value);
  - ``format: int32/int64`` ranges.

  The embedded pod templates of custom kinds (PyTorchJob replicas, TrainingRuntime and TrainJob
  patch pod templates) are also validated as core ``PodTemplate`` objects, so core-field typos
  inside a PyTorchJob are caught by the Kubernetes schema too. PyTorchJob's webhook rules
  (replica types, Master replicas 1, a ``pytorch`` container with an image, elasticPolicy needs
  a Worker) are checked as well (/work/shared/LAUNCH.md §1), and so are the batch/v1 Job rules
  of Jobs and of a JobSet's job templates (pod restartPolicy Never/OnFailure; podFailurePolicy
  needs Never, exit codes sorted, unique, no 0 with In, a real containerName).

- Every pod spec (core kinds and embedded): the API server's semantic rules that a schema
  cannot say: volume mounts name a volume of the pod, mount paths and port names are unique,
  port names are IANA service names, resource names are standard or qualified, extended
  resources request what they limit, requests do not exceed limits.

Not checked: CEL rules (``x-kubernetes-validations``) and defaults; admission webhooks beyond
the PyTorchJob rules above.

An object of an unknown kind (no CRD, not a core group) raises :class:`ValidationError`: a
validator that passed what it cannot check would hide typos in ``apiVersion``/``kind``.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pytest
import yaml

from tests.conftest import unavailable

#: Where the upstream CRDs live: the shared folder beside the repository checkout.
DEFAULT_CRD_DIR = Path(__file__).resolve().parents[3] / "shared" / "crds"
CRD_DIR_ENV = "SAM_SHARED_CRDS"
DEFAULT_KUBE_VERSION = "1.31"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences",
    "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
    "deletionGracePeriodSeconds", "managedFields", "selfLink"})
_ANNOTATIONS_MAX_BYTES = 256 * 1024
#: Kinds whose name the controller turns into pod and Service names (``<job>-worker-3``),
#: which must be DNS-1035 labels: such names must be labels themselves.
_LABEL_NAMED_KINDS = frozenset({"PyTorchJob", "TrainJob"})
#: libyaml's loader when PyYAML has it: the CRDs are 3 MB of YAML (seconds in pure Python).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}

#: Where each custom kind embeds pod templates: key paths, ``*`` = every map value / list item.
POD_TEMPLATE_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "PyTorchJob": (("spec", "pytorchReplicaSpecs", "*", "template"),),
    "TrainingRuntime": (("spec", "template", "spec", "replicatedJobs", "*", "template", "spec", "template"),),
    "ClusterTrainingRuntime": (("spec", "template", "spec", "replicatedJobs", "*", "template", "spec", "template"),),
    "TrainJob": (("spec", "runtimePatches", "*", "trainingRuntimeSpec", "template", "spec", "replicatedJobs", "*",
                  "template", "spec", "template"),),
}


#: Where each custom kind embeds batch/v1 Job templates (a JobSet's replicated jobs).
JOB_TEMPLATE_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "TrainingRuntime": (("spec", "template", "spec", "replicatedJobs", "*", "template"),),
    "ClusterTrainingRuntime": (("spec", "template", "spec", "replicatedJobs", "*", "template"),),
}


class CrdsNotPresent(Exception):
    """The shared CRD folder is missing (a fresh clone): custom kinds cannot be checked."""


@dataclass(frozen=True)
class Problem:
    """One validation error: a JSON path into the object (``$.spec.x[0].y``) and a message."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ValidationError(Exception):
    """An object failed validation; names its kind/name and every error's JSON path."""

    def __init__(self, kind: str, name: str, problems: Sequence[Problem]) -> None:
        self.kind = kind
        self.name = name
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{kind}/{name}: {len(self.problems)} error(s)\n{lines}")


# --------------------------------------------------------------------------- paths


def json_path(parts: Sequence[Any]) -> str:
    """``("spec", "containers", 0, "name")`` -> ``$.spec.containers[0].name``."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _walk(obj: Any, pattern: Sequence[str], prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Values at ``pattern`` (``*`` = every map value or list item), with their key paths."""
    if not pattern:
        yield prefix, obj
        return
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, list) else ()
        for key, value in items:
            yield from _walk(value, rest, prefix + (key,))
    elif isinstance(obj, Mapping) and head in obj:
        yield from _walk(obj[head], rest, prefix + (head,))


# --------------------------------------------------------------------------- CRDs


def crd_dir() -> Path:
    """The CRD folder (``$SAM_SHARED_CRDS`` or ``../shared/crds``)."""
    return Path(os.environ.get(CRD_DIR_ENV) or DEFAULT_CRD_DIR)


def crds_present() -> bool:
    """Whether the CRD folder exists and holds CRD files."""
    folder = crd_dir()
    return folder.is_dir() and any(folder.glob("*.yaml"))


def require_crds() -> Path:
    """The CRD folder, or skip the calling test saying why."""
    folder = crd_dir()
    if not crds_present():
        pytest.skip(f"../shared/crds not present: {folder} (set {CRD_DIR_ENV} to a folder of upstream CRDs) "
                    "- custom kinds cannot be validated")
    return folder


@functools.lru_cache(maxsize=4)
def _crd_index(folder: str) -> dict[tuple[str, str], dict[str, dict]]:
    """``{(group, kind): {version: openAPIV3Schema}}`` of every served version in ``folder``."""
    index: dict[tuple[str, str], dict[str, dict]] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=_YAML_LOADER):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            versions = index.setdefault((spec["group"], spec["names"]["kind"]), {})
            for version in spec["versions"]:
                if version.get("served", True):
                    versions[version["name"]] = version["schema"]["openAPIV3Schema"]
    return index


def _fix_pattern(pattern: str) -> str:
    """Go's ``^(?i)...`` as Python accepts it (``(?i)^...``): same meaning."""
    if pattern.startswith("^(?i)"):
        return "(?i)^" + pattern[len("^(?i)"):]
    return pattern


def strict_schema(schema: Any) -> Any:
    """A copy of a CRD schema with closed objects and Python-compatible patterns."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key == "pattern":
            out[key] = _fix_pattern(value)
            re.compile(out[key])  # a pattern Python cannot compile must fail loudly here, not pass
        elif key in ("default", "example", "enum", "x-kubernetes-list-map-keys", "required"):
            out[key] = copy.deepcopy(value)
        else:
            out[key] = strict_schema(value)
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _crd_schema(group: str, kind: str, version: str) -> dict | None:
    """The strict schema of ``group/version`` ``kind`` (None if no CRD has it), cached."""
    folder = crd_dir()
    if not crds_present():
        raise CrdsNotPresent(f"../shared/crds not present: {folder} (set {CRD_DIR_ENV})")
    versions = _crd_index(str(folder)).get((group, kind))
    if versions is None:
        return None
    if version not in versions:
        return {"__missing_version__": sorted(versions)}
    return _strict_crd_schema(str(folder), group, kind, version)


@functools.lru_cache(maxsize=64)
def _strict_crd_schema(folder: str, group: str, kind: str, version: str) -> dict:
    schema = strict_schema(_crd_index(folder)[(group, kind)][version])
    # The API server implies apiVersion, kind and metadata at the root of every CRD schema;
    # metadata is checked by metadata_problems (the CRDs' `{type: object}` says nothing).
    properties = schema.setdefault("properties", {})
    properties.setdefault("apiVersion", {"type": "string"})
    properties.setdefault("kind", {"type": "string"})
    properties["metadata"] = {"type": "object"}
    return schema


def crd_groups() -> set[str]:
    """API groups that have a CRD in the CRD folder (empty if the folder is absent)."""
    folder = crd_dir()
    if not crds_present():
        return set()
    return {group for group, _ in _crd_index(str(folder))}


# --------------------------------------------------------------------------- jsonschema


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict) -> Iterator[Any]:
    """``x-kubernetes-list-type``: ``map`` keys and ``set`` items must be unique."""
    from jsonschema import ValidationError as SchemaError

    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen: list = []
        for item in instance:
            if item in seen:
                yield SchemaError(f"duplicate item {item!r} in a list-type=set list")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        item_props = (schema.get("items") or {}).get("properties", {})
        seen_keys: dict[tuple, int] = {}
        for index, item in enumerate(instance):
            if not isinstance(item, Mapping):
                continue
            # A missing key takes its schema default (ports: protocol TCP), as the server does.
            key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
            if key in seen_keys:
                shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
                yield SchemaError(f"duplicate entry [{index}] with {shown} (also [{seen_keys[key]}]): "
                                  f"list-type=map keys {keys} must be unique")
            seen_keys.setdefault(key, index)


def _int_or_string(validator: Any, enabled: bool, instance: Any, schema: dict) -> Iterator[Any]:
    from jsonschema import ValidationError as SchemaError

    if enabled and isinstance(instance, float):
        yield SchemaError(f"{instance!r} is a float: an int-or-string field (a quantity or port) takes an "
                          f"integer or a quoted string (the API server rejects floats; quote it)")


def _type_nullable(validator: Any, types: Any, instance: Any, schema: dict) -> Iterator[Any]:
    """``type`` that lets ``null`` through where the schema says ``nullable: true``."""
    import jsonschema

    if instance is None and schema.get("nullable"):
        return
    if instance is None:
        from jsonschema import ValidationError as SchemaError

        yield SchemaError(f"null is not allowed here (expected {types}): a template rendered an unset value")
        return
    yield from jsonschema.Draft4Validator.VALIDATORS["type"](validator, types, instance, schema)


def _format(validator: Any, fmt: str, instance: Any, schema: dict) -> Iterator[Any]:
    from jsonschema import ValidationError as SchemaError

    bounds = _INT_RANGES.get(fmt)
    if bounds and isinstance(instance, int) and not isinstance(instance, bool):
        if not bounds[0] <= instance <= bounds[1]:
            yield SchemaError(f"{instance} is out of the {fmt} range")


@functools.lru_cache(maxsize=1)
def _validator_class() -> type:
    import jsonschema

    # OpenAPI v3.0 schemas follow draft 4 (boolean exclusiveMinimum; 2.0 is not an integer).
    return jsonschema.validators.extend(jsonschema.Draft4Validator, {
        "type": _type_nullable,
        "format": _format,
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-int-or-string": _int_or_string,
    })


@functools.lru_cache(maxsize=64)
def _compiled(folder: str, group: str, kind: str, version: str) -> Any:
    schema = _strict_crd_schema(folder, group, kind, version)
    return _validator_class()(schema)


def _schema_problems(validator: Any, obj: Any, prefix: Sequence[Any] = ()) -> list[Problem]:
    problems = []
    for error in validator.iter_errors(obj):
        if (error.validator == "anyOf" and isinstance(error.instance, float)
                and error.schema.get("x-kubernetes-int-or-string")):
            continue  # _int_or_string says it more clearly
        message = error.message
        if error.context:  # anyOf/oneOf: say what each branch wanted
            message += " (" + "; ".join(sorted({c.message for c in error.context})) + ")"
        problems.append(Problem(json_path([*prefix, *error.absolute_path]), message))
    return problems


# --------------------------------------------------------------------------- metadata


def _check_qualified_key(key: Any, what: str) -> str | None:
    if not isinstance(key, str):
        return f"{what} key {key!r} is not a string"
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return f"{what} key {key!r}: prefix must be a DNS-1123 subdomain of at most 253 characters"
    if len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return f"{what} key {key!r}: name part must be at most 63 alphanumerics, '-', '_' or '.'"
    return None


def metadata_problems(meta: Any, path: Sequence[Any], kind: str, embedded: bool = False) -> list[Problem]:
    """ObjectMeta basics: known fields, name syntax, string maps of labels and annotations."""
    where = json_path(path)
    if not isinstance(meta, Mapping):
        return [Problem(where, "metadata must be an object")] if not embedded or meta is not None else []
    problems = [Problem(json_path([*path, key]), "unknown ObjectMeta field")
                for key in meta if key not in _OBJECT_META_FIELDS]
    name = meta.get("name")
    if name is None and not embedded and not meta.get("generateName"):
        problems.append(Problem(json_path([*path, "name"]), "metadata.name is required"))
    if name is not None:
        if not isinstance(name, str) or len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            problems.append(Problem(json_path([*path, "name"]),
                                    f"{name!r} is not a DNS-1123 subdomain (lower case, '-', '.', at most 253)"))
        elif kind in _LABEL_NAMED_KINDS and (len(name) > 63 or not _DNS1035_LABEL.match(name)):
            problems.append(Problem(json_path([*path, "name"]),
                                    f"{name!r}: a {kind} name becomes pod and Service names and must be "
                                    f"a DNS-1035 label (at most 63, starts with a letter)"))
    namespace = meta.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or len(namespace) > 63
                                  or not _DNS1123_LABEL.match(namespace)):
        problems.append(Problem(json_path([*path, "namespace"]), f"{namespace!r} is not a DNS-1123 label"))
    problems += _string_map_problems(meta.get("labels"), [*path, "labels"], "label", label_values=True)
    problems += _string_map_problems(meta.get("annotations"), [*path, "annotations"], "annotation",
                                     label_values=False)
    return problems


def _string_map_problems(mapping: Any, path: list, what: str, label_values: bool) -> list[Problem]:
    if mapping is None:
        return []
    if not isinstance(mapping, Mapping):
        return [Problem(json_path(path), f"{what}s must be a map of strings")]
    problems = []
    for key, value in mapping.items():
        key_problem = _check_qualified_key(key, what)
        if key_problem:
            problems.append(Problem(json_path([*path, key]), key_problem))
        if not isinstance(value, str):
            problems.append(Problem(json_path([*path, key]),
                                    f"{what} value {value!r} is a {type(value).__name__}, not a string (quote it)"))
        elif label_values and (len(value) > 63 or not _LABEL_VALUE.match(value)):
            problems.append(Problem(json_path([*path, key]),
                                    f"label value {value!r} must be at most 63 alphanumerics, '-', '_' or '.'"))
    if not label_values:
        size = sum(len(str(k)) + len(str(v)) for k, v in mapping.items())
        if size > _ANNOTATIONS_MAX_BYTES:
            problems.append(Problem(json_path(path), f"annotations total {size} bytes > 256 KiB"))
    return problems


# --------------------------------------------------------------------------- core kinds


def _is_core_group(group: str) -> bool:
    """Built-in API groups: the legacy core group, dotless groups and ``*.k8s.io`` (not ``x-k8s.io``)."""
    return group == "" or "." not in group or (group.endswith(".k8s.io") and not group.endswith(".x-k8s.io"))


def kubernetes_validate() -> Any:
    """The ``kubernetes_validate`` module, or skip (fail under CI, where the test extras install it)."""
    try:
        import kubernetes_validate as kv
    except ImportError as err:
        unavailable(f"needs kubernetes-validate==1.37.* (offline core schemas; the test extras install it): {err}")
    _cache_schema_files(kv)
    return kv


def _cache_schema_files(kv: Any) -> None:
    """Keep kubernetes-validate's parsed schema files in memory.

    ``kubernetes_validate.validate`` re-reads and re-parses its JSON schema files (the
    definitions file is megabytes) on every call: ~2/3 of a chart render's validation time.
    Its module-level ``schema_contents`` is wrapped in a cache; jsonschema only reads the
    schemas, so sharing the parsed dicts is safe. Validation itself is unchanged.
    """
    utils = kv.utils
    if not getattr(utils.schema_contents, "sam_cached", False):
        cached = functools.lru_cache(maxsize=512)(utils.schema_contents)
        cached.sam_cached = True  # type: ignore[attr-defined]
        utils.schema_contents = cached


def _core_problems(obj: Mapping[str, Any], kube_version: str, prefix: Sequence[Any] = (),
                   strip: int = 0) -> list[Problem]:
    """kubernetes-validate's strict check; ``strip`` leading path parts are replaced by ``prefix``."""
    kv = kubernetes_validate()
    try:
        kv.validate(dict(obj), kube_version, strict=True)
    except kv.ValidationError as err:
        return [Problem(json_path([*prefix, *list(err.absolute_path)[strip:]]), err.message)]
    except kv.SchemaNotFoundError:
        raise
    return []


# --------------------------------------------------------------------------- custom kinds


def _pod_template_problems(kind: str, obj: Mapping[str, Any], kube_version: str) -> list[Problem]:
    """Every embedded pod template, validated strictly as a core ``PodTemplate``."""
    problems: list[Problem] = []
    for pattern in POD_TEMPLATE_PATHS.get(kind, ()):
        for path, template in _walk(obj, pattern):
            if not isinstance(template, Mapping):
                continue
            problems += metadata_problems(template.get("metadata"), [*path, "metadata"], "Pod", embedded=True)
            problems += pod_spec_problems(template.get("spec"), [*path, "spec"], partial=kind == "TrainJob")
            # A TrainJob patch may carry no containers (only pod-level settings); the core schema
            # requires them, and the CRD's own schema already checked every field of the patch.
            if kind == "TrainJob" and "containers" not in (template.get("spec") or {}):
                continue
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": "embedded"}, "template": dict(template)}
            problems += _core_problems(wrapped, kube_version, prefix=path, strip=1)
    return problems


# --------------------------------------------------------------------------- pod rules

_NATIVE_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage"})
_IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")
_SUFFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: Any) -> float | None:
    """A Kubernetes quantity (``"64Gi"``, ``"500m"``, ``8``) as a number; None if not one."""
    found = _QUANTITY.match(str(value).strip())
    if not found:
        return None
    number, suffix = found[1], found[2] or ""
    if suffix[:1] in ("e", "E"):
        return float(number + suffix)
    return float(number) * _SUFFIX[suffix]


def _resources_problems(resources: Any, path: list) -> list[Problem]:
    """Resource names, extended resources (requests == limits) and requests <= limits."""
    if not isinstance(resources, Mapping):
        return []
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    problems = []
    for part, values in (("requests", requests), ("limits", limits)):
        for name in values:
            native = name in _NATIVE_RESOURCES or str(name).startswith("hugepages-")
            if not native and "/" not in str(name):
                problems.append(Problem(json_path([*path, part, name]),
                                        f"{name!r} is neither a standard resource (cpu, memory, ...) nor "
                                        f"fully qualified (e.g. nvidia.com/gpu)"))
    for name, amount in requests.items():
        want, limit = quantity(amount), quantity(limits.get(name)) if name in limits else None
        if "/" in str(name) and (name not in limits or want != limit):
            problems.append(Problem(json_path([*path, "requests", name]),
                                    "an extended resource request must equal its limit"))
        elif limit is not None and want is not None and want > limit:
            problems.append(Problem(json_path([*path, "requests", name]),
                                    f"request {amount} is more than the limit {limits[name]}"))
    return problems


def pod_spec_problems(spec: Any, path: Sequence[Any], partial: bool = False) -> list[Problem]:
    """PodSpec rules the API server checks beyond the schema.

    Volume mounts name existing volumes (not for a ``partial`` patch, which merges into a
    runtime's pod), mount paths and port names are unique, port names are IANA service names,
    resource names are valid and requests fit the limits.
    """
    if not isinstance(spec, Mapping):
        return []
    volumes = {v.get("name") for v in spec.get("volumes") or () if isinstance(v, Mapping)}
    problems: list[Problem] = []
    port_names: set = set()
    for key in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(key) or ()):
            if not isinstance(container, Mapping):
                continue
            where = [*path, key, index]
            problems += _resources_problems(container.get("resources"), [*where, "resources"])
            mount_paths: set = set()
            for m_index, mount in enumerate(container.get("volumeMounts") or ()):
                if not partial and mount.get("name") not in volumes:
                    problems.append(Problem(json_path([*where, "volumeMounts", m_index, "name"]),
                                            f"no volume named {mount.get('name')!r} in the pod"))
                if mount.get("mountPath") in mount_paths:
                    problems.append(Problem(json_path([*where, "volumeMounts", m_index, "mountPath"]),
                                            f"{mount.get('mountPath')!r} is mounted twice"))
                mount_paths.add(mount.get("mountPath"))
            for p_index, port in enumerate(container.get("ports") or ()):
                name = port.get("name")
                if name is None:
                    continue
                if len(str(name)) > 15 or not _IANA_SVC_NAME.match(str(name)):
                    problems.append(Problem(json_path([*where, "ports", p_index, "name"]),
                                            f"{name!r} is not an IANA service name (at most 15 of a-z0-9-, a letter)"))
                if name in port_names:
                    problems.append(Problem(json_path([*where, "ports", p_index, "name"]),
                                            f"port name {name!r} is used twice in the pod"))
                port_names.add(name)
    return problems


def job_spec_problems(spec: Any, path: Sequence[Any]) -> list[Problem]:
    """The batch/v1 Job rules the API server checks beyond the schema (pod failure policy)."""
    if not isinstance(spec, Mapping):
        return []
    pod_spec = ((spec.get("template") or {}).get("spec")) or {}
    restart = pod_spec.get("restartPolicy")
    problems = []
    if restart not in ("Never", "OnFailure"):
        problems.append(Problem(json_path([*path, "template", "spec", "restartPolicy"]),
                                f"a Job's pods need restartPolicy Never or OnFailure, got {restart!r}"))
    policy = spec.get("podFailurePolicy")
    if not isinstance(policy, Mapping):
        return problems
    if restart != "Never":
        problems.append(Problem(json_path([*path, "podFailurePolicy"]),
                                "podFailurePolicy needs the pod template's restartPolicy Never"))
    names = {c.get("name") for key in ("containers", "initContainers") for c in pod_spec.get(key) or ()}
    for index, rule in enumerate(policy.get("rules") or ()):
        codes = (rule or {}).get("onExitCodes")
        if not isinstance(codes, Mapping):
            continue
        where = [*path, "podFailurePolicy", "rules", index, "onExitCodes"]
        values = codes.get("values") or []
        if list(values) != sorted(set(values)):
            problems.append(Problem(json_path([*where, "values"]), "values must be sorted and unique"))
        if codes.get("operator") == "In" and 0 in values:
            problems.append(Problem(json_path([*where, "values"]), "0 is not allowed with operator In"))
        if len(values) > 255:
            problems.append(Problem(json_path([*where, "values"]), f"{len(values)} values > 255"))
        if codes.get("containerName") is not None and codes["containerName"] not in names:
            problems.append(Problem(json_path([*where, "containerName"]),
                                    f"{codes['containerName']!r} is not a container of the pod template"))
    return problems


#: Where core kinds keep their pod spec.
_CORE_POD_SPECS = {"Pod": ("spec",), "PodTemplate": ("template", "spec"), "Job": ("spec", "template", "spec"),
                   "Deployment": ("spec", "template", "spec"), "StatefulSet": ("spec", "template", "spec"),
                   "DaemonSet": ("spec", "template", "spec")}


def _core_pod_problems(obj: Mapping[str, Any]) -> list[Problem]:
    kind = obj["kind"]
    problems = []
    if kind in _CORE_POD_SPECS:
        path = _CORE_POD_SPECS[kind]
        problems += pod_spec_problems(next((v for _, v in _walk(obj, path)), None), path)
    if kind == "Job" and obj["apiVersion"] == "batch/v1":
        problems += job_spec_problems(obj.get("spec"), ["spec"])
    return problems


def _job_template_problems(kind: str, obj: Mapping[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    for pattern in JOB_TEMPLATE_PATHS.get(kind, ()):
        for path, template in _walk(obj, pattern):
            if isinstance(template, Mapping):
                problems += job_spec_problems(template.get("spec"), [*path, "spec"])
    return problems


def _pytorchjob_webhook_problems(obj: Mapping[str, Any]) -> list[Problem]:
    """The training-operator v1 webhook rules (LAUNCH.md §1)."""
    spec = obj.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    base = ["spec", "pytorchReplicaSpecs"]
    problems = []
    if not replicas:
        problems.append(Problem(json_path(base), "pytorchReplicaSpecs needs Master and/or Worker"))
    for rtype, rspec in replicas.items():
        if rtype not in ("Master", "Worker"):
            problems.append(Problem(json_path([*base, rtype]), "replica type must be Master or Worker"))
        if not isinstance(rspec, Mapping):
            continue
        if rtype == "Master" and rspec.get("replicas", 1) != 1:
            problems.append(Problem(json_path([*base, rtype, "replicas"]), "Master replicas must be 1"))
        containers = ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []
        pytorch = [c for c in containers if isinstance(c, Mapping) and c.get("name") == "pytorch"]
        if not pytorch or not pytorch[0].get("image"):
            problems.append(Problem(json_path([*base, rtype, "template", "spec", "containers"]),
                                    "needs a container named 'pytorch' with an image"))
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in replicas:
            problems.append(Problem(json_path(["spec", "elasticPolicy"]), "elasticPolicy requires a Worker spec"))
        if isinstance(elastic, Mapping) and "nProcPerNode" in elastic and "nprocPerNode" in spec:
            problems.append(Problem(json_path(["spec", "elasticPolicy", "nProcPerNode"]),
                                    "spec.nprocPerNode and elasticPolicy.nProcPerNode are mutually exclusive"))
    return problems


def _custom_problems(obj: Mapping[str, Any], group: str, version: str, kube_version: str) -> list[Problem] | None:
    """Problems of a custom-kind object, or None when no CRD defines its kind."""
    kind = obj["kind"]
    schema = _crd_schema(group, kind, version)
    if schema is None:
        return None
    if "__missing_version__" in schema:
        return [Problem("$.apiVersion", f"{group}/{version} does not serve {kind}; "
                                        f"served: {schema['__missing_version__']}")]
    validator = _compiled(str(crd_dir()), group, kind, version)
    problems = _schema_problems(validator, obj)
    problems += metadata_problems(obj.get("metadata"), ["metadata"], kind)
    problems += _pod_template_problems(kind, obj, kube_version)
    problems += _job_template_problems(kind, obj)
    if kind == "PyTorchJob":
        problems += _pytorchjob_webhook_problems(obj)
    return problems


def validate(obj: Mapping[str, Any], kube_version: str = DEFAULT_KUBE_VERSION) -> None:
    """Raise :class:`ValidationError` unless ``obj`` would pass a strict API server.

    Raises:
        ValidationError: schema errors (with JSON paths), or an unknown kind.
        CrdsNotPresent: a custom kind, but the CRD folder is missing (see :func:`require_crds`).
    """
    if not isinstance(obj, Mapping):
        raise ValidationError("?", "?", [Problem("$", f"not an object: {type(obj).__name__}")])
    kind = obj.get("kind")
    api_version = obj.get("apiVersion")
    name = str((obj.get("metadata") or {}).get("name", "?")) if isinstance(obj.get("metadata"), Mapping) else "?"
    if not isinstance(kind, str) or not isinstance(api_version, str) or not kind or not api_version:
        raise ValidationError(str(kind), name, [Problem("$", "apiVersion and kind are required strings")])
    group, _, version = api_version.rpartition("/")
    problems: list[Problem] | None = None
    if group in crd_groups() or not _is_core_group(group):
        problems = _custom_problems(obj, group, version, kube_version)
    if problems is None and _is_core_group(group):
        kv = kubernetes_validate()
        try:
            problems = _core_problems(obj, kube_version)
        except kv.SchemaNotFoundError:
            problems = None
        else:
            problems += metadata_problems(obj.get("metadata"), ["metadata"], kind)
            problems += _core_pod_problems(obj)
    if problems is None:
        raise ValidationError(kind, name, [Problem("$.kind", f"unknown kind {kind} of {api_version}: neither a "
                                                             f"core kind nor a CRD in {crd_dir()}")])
    if problems:
        # The CRD schema and the core PodTemplate check may report the same typo: once is enough.
        raise ValidationError(kind, name, list(dict.fromkeys(problems)))


def validate_all(objects: Sequence[Mapping[str, Any]], kube_version: str = DEFAULT_KUBE_VERSION) -> None:
    """Validate every object; one error listing all failing objects."""
    failures = []
    for obj in objects:
        try:
            validate(obj, kube_version)
        except ValidationError as err:
            failures.append(str(err))
    if failures:
        raise AssertionError("invalid objects:\n" + "\n".join(failures))
