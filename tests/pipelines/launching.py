"""The launch step's function called with the recorded job's inputs (release ``demo``, tiny-cpu, ns ``ml``).

Shared by ``test_launch.py`` and ``test_launcher_rbac.py``; imports kfp, so only test modules that
called ``require_kfp()`` import it.
"""

from __future__ import annotations

from pipelines.components import launch_and_wait
from tests.pipelines.conftest import PRESETS_DIR, preset_values_json

SHARDS = "gs://sam-demo/synth/sa_*.tar"
RUN_DIR = "gs://sam-demo/runs/demo"
RUN_ID = "3f0c9a1e-5b7d-4c2a-9e61-0d4b8f2a7c55"
JOB = "demo-sam-train"  # release "demo": the recordings' job


def launch(**overrides: object) -> str:
    """Run the launch step's function with the recordings' job (release demo, tiny-cpu, ns ml)."""
    args = dict(data_shards=SHARDS, run_dir=RUN_DIR, preset="tiny-cpu", preset_values=preset_values_json(),
                values_json="", set_values=[], nodes=0, gpus_per_node=-1, node_pool="", image="", job_name="demo",
                namespace="", timeout_s=60, run_id=RUN_ID, poll_interval_s=0, log_lines=20)
    args.update(overrides)
    return launch_and_wait.python_func(**args)


def expected_objects(*sets: str) -> list[dict]:
    """What ``helm install demo -n ml -f presets/tiny-cpu.yaml --set ...`` gives, as the builder builds it."""
    from trainer.launch import JobSpec, build_objects

    spec = JobSpec.load([str(PRESETS_DIR / "tiny-cpu.yaml")],
                        [f"training.dataShards={SHARDS}", f"training.runDir={RUN_DIR}", *sets], name="demo",
                        namespace="ml")
    return build_objects(spec)
