"""The ``torchx.schedulers`` and ``torchx.components`` entry points of the package.

torchx 0.7.0 drops its built-in schedulers (and components) as soon as any entry point of the
group exists, so the package registers the built-ins again next to its own: these tests fail
if the entry points are missing or if a built-in vanished.
"""

from __future__ import annotations

import inspect

import pytest

from tests.torchx import require_torchx

require_torchx()

from tests.torchx.conftest import COMPONENT_FILE  # noqa: E402


def test_schedulers_include_pytorchjob_and_every_builtin() -> None:
    from torchx.schedulers import DEFAULT_SCHEDULER_MODULES, get_scheduler_factories

    names = set(get_scheduler_factories())
    assert {"pytorchjob", "local_cwd", "kubernetes", "local_docker"} <= names
    assert set(DEFAULT_SCHEDULER_MODULES) <= names, set(DEFAULT_SCHEDULER_MODULES) - names


def test_factories_build_the_right_schedulers() -> None:
    from torchx.schedulers import get_scheduler_factories
    from torchx.schedulers.kubernetes_scheduler import KubernetesScheduler
    from torchx.schedulers.local_scheduler import LocalScheduler

    from trainer.launch.torchx_scheduler import PyTorchJobScheduler

    factories = get_scheduler_factories()
    ours = factories["pytorchjob"]("test-session")
    assert isinstance(ours, PyTorchJobScheduler) and ours.backend == "pytorchjob"
    assert ours.session_name == "test-session"
    assert isinstance(factories["local_cwd"]("test-session"), LocalScheduler)
    assert isinstance(factories["kubernetes"]("test-session"), KubernetesScheduler)
    # The runner passes its scheduler_params to every factory: ours must accept unknown ones.
    assert isinstance(factories["pytorchjob"]("s", cache_size=3), PyTorchJobScheduler)


def test_components_include_sam_train_and_the_builtins() -> None:
    from torchx.specs.finder import get_component, get_components

    from trainer.launch.torchx_component import sam_train

    names = set(get_components())
    assert "sam_train" in names
    assert {"dist.ddp", "utils.echo", "utils.python"} <= names  # still there next to ours
    assert get_component("sam_train").fn is sam_train


def test_component_passes_the_torchx_linter() -> None:
    from torchx.specs.file_linter import validate

    assert validate(str(COMPONENT_FILE), "sam_train") == []


def test_component_help_documents_every_argument() -> None:
    from torchx.specs.file_linter import get_fn_docstring

    from trainer.launch.torchx_component import sam_train

    description, args = get_fn_docstring(sam_train)
    assert description.startswith("Train SAM")
    undocumented = [name for name in inspect.signature(sam_train).parameters if not args[name].strip()]
    assert undocumented == []


@pytest.mark.parametrize("group", ["torchx.schedulers", "torchx.components"])
def test_entry_points_come_from_the_package(group: str) -> None:
    """Registered by sam-k8s-trainer itself (pyproject.toml), built-ins included."""
    import importlib.metadata as md

    from torchx.schedulers import DEFAULT_SCHEDULER_MODULES

    ours = {ep.name: ep.value for ep in md.entry_points(group=group)
            if ep.dist is not None and ep.dist.metadata["Name"] == "sam-k8s-trainer"}
    if group == "torchx.schedulers":
        assert ours.get("pytorchjob") == "trainer.launch.torchx_scheduler:create_scheduler"
        for name, module in DEFAULT_SCHEDULER_MODULES.items():
            assert ours.get(name) == f"{module}:create_scheduler", name
    else:
        assert "trainer.launch.torchx_component" in ours.values(), ours
        assert "torchx.components" in ours.values(), ours  # the built-ins, under their own names
