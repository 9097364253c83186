"""Launching training jobs from Python: one job description, rendered like the Helm chart.

- :class:`trainer.launch.spec.JobSpec`: the typed job (every value of ``charts/sam-train/values.yaml``);
- :func:`trainer.launch.build.build_objects`: its ConfigMap, ServiceAccount and PyTorchJob or
  TrainJob (+ TrainingRuntime), the objects ``helm template`` of the chart gives.

Importing this package imports no Kubernetes client and no torch.
"""

from __future__ import annotations

from trainer.launch.build import build_objects, job_object
from trainer.launch.spec import JobSpec, SpecError

__all__ = ["JobSpec", "SpecError", "build_objects", "job_object"]
