"""Node pool presets (``nodePool.preset``): a copy of ``charts/sam-train/templates/_nodepools.tpl``.

Each preset gives the node labels to select, the taints to tolerate, extra extended resources
(EFA interfaces on EKS) and the fabric's env. Labels are the ones the platforms set
(/work/shared/LAUNCH.md section 6):

- GKE: ``cloud.google.com/gke-accelerator``; GPU pools are tainted ``nvidia.com/gpu=present:NoSchedule``
  (every GPU pod tolerates ``nvidia.com/gpu`` anyway, see :mod:`trainer.launch.pod`);
- EKS: ``node.kubernetes.io/instance-type``; no automatic taint (teams add ``nvidia.com/gpu:NoSchedule``);
  p4d/p4de have 4 EFA interfaces, p5 32 (aws-ofi-nccl reads ``FI_PROVIDER``);
- NVIDIA GPU Operator / GPU Feature Discovery: ``nvidia.com/gpu.present`` and ``nvidia.com/gpu.product``.

``tests/unit/test_launch_build.py`` renders every preset through the chart and compares.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class NodePoolPreset:
    """What one preset adds to the pods."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, str], ...] = ()
    extra_resources: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
_EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}


def _gke(accelerator: str) -> NodePoolPreset:
    return NodePoolPreset(node_selector={"cloud.google.com/gke-accelerator": accelerator})


def _eks(instance_type: str, efa: str) -> NodePoolPreset:
    return NodePoolPreset(node_selector={"node.kubernetes.io/instance-type": instance_type},
                          tolerations=(GPU_TOLERATION,), extra_resources={"vpc.amazonaws.com/efa": efa},
                          env=_EFA_ENV)


def _gfd(product: str) -> NodePoolPreset:
    return NodePoolPreset(node_selector={"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product})


#: Preset name -> what it adds, in the order values.yaml documents them.
NODE_POOLS: dict[str, NodePoolPreset] = {
    "none": NodePoolPreset(),
    "gke-a2-highgpu": _gke("nvidia-tesla-a100"),
    "gke-a2-ultragpu": _gke("nvidia-a100-80gb"),
    "gke-a3-highgpu": _gke("nvidia-h100-80gb"),
    "eks-p4d": _eks("p4d.24xlarge", "4"),
    "eks-p4de": _eks("p4de.24xlarge", "4"),
    "eks-p5": _eks("p5.48xlarge", "32"),
    "gpu-operator-a100-40gb": _gfd("NVIDIA-A100-SXM4-40GB"),
    "gpu-operator-a100-80gb": _gfd("NVIDIA-A100-SXM4-80GB"),
    "gpu-operator-h100-80gb": _gfd("NVIDIA-H100-80GB-HBM3"),
}


def node_pool(name: str) -> NodePoolPreset:
    """The preset ``name`` (a copy of its mutable parts is up to the caller: use :func:`copy.deepcopy`).

    Raises:
        KeyError: an unknown preset, with the chart's message listing the known ones.
    """
    if name not in NODE_POOLS:
        raise KeyError(f"nodePool.preset {name!r} is unknown; one of: {', '.join(sorted(NODE_POOLS))}")
    return copy.deepcopy(NODE_POOLS[name])
