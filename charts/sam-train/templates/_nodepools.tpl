{{/*
Node pool presets (nodePool.preset): the node labels to select, the taints to tolerate, extra
extended resources (EFA) and env of the fabric. Labels are the ones the platforms set
(/work/shared/LAUNCH.md §6):
  - GKE: cloud.google.com/gke-accelerator; GPU pools are tainted nvidia.com/gpu=present:NoSchedule
    (the toleration is added to every GPU pod anyway, see _pod.tpl);
  - EKS: node.kubernetes.io/instance-type; no automatic taint, teams add nvidia.com/gpu:NoSchedule;
    p4d/p4de have 4 EFA interfaces, p5 32 (aws-ofi-nccl reads FI_PROVIDER);
  - NVIDIA GPU Operator / GPU Feature Discovery: nvidia.com/gpu.present and nvidia.com/gpu.product.
Returns a YAML dict: {nodeSelector, tolerations, extraResources, env}. The values schema
restricts nodePool.preset to these names.
*/}}
{{- define "sam-train.nodePools" -}}
{{- $gpuToleration := dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule" -}}
{{- $efaEnv := dict "FI_PROVIDER" "efa" "FI_EFA_USE_DEVICE_RDMA" "1" -}}
{{- $pools := dict
  "none" (dict)
  "gke-a2-highgpu" (dict "nodeSelector" (dict "cloud.google.com/gke-accelerator" "nvidia-tesla-a100"))
  "gke-a2-ultragpu" (dict "nodeSelector" (dict "cloud.google.com/gke-accelerator" "nvidia-a100-80gb"))
  "gke-a3-highgpu" (dict "nodeSelector" (dict "cloud.google.com/gke-accelerator" "nvidia-h100-80gb"))
  "eks-p4d" (dict "nodeSelector" (dict "node.kubernetes.io/instance-type" "p4d.24xlarge")
                  "tolerations" (list $gpuToleration)
                  "extraResources" (dict "vpc.amazonaws.com/efa" "4")
                  "env" $efaEnv)
  "eks-p4de" (dict "nodeSelector" (dict "node.kubernetes.io/instance-type" "p4de.24xlarge")
                   "tolerations" (list $gpuToleration)
                   "extraResources" (dict "vpc.amazonaws.com/efa" "4")
                   "env" $efaEnv)
  "eks-p5" (dict "nodeSelector" (dict "node.kubernetes.io/instance-type" "p5.48xlarge")
                 "tolerations" (list $gpuToleration)
                 "extraResources" (dict "vpc.amazonaws.com/efa" "32")
                 "env" $efaEnv)
  "gpu-operator-a100-40gb" (dict "nodeSelector" (dict "nvidia.com/gpu.present" "true" "nvidia.com/gpu.product" "NVIDIA-A100-SXM4-40GB"))
  "gpu-operator-a100-80gb" (dict "nodeSelector" (dict "nvidia.com/gpu.present" "true" "nvidia.com/gpu.product" "NVIDIA-A100-SXM4-80GB"))
  "gpu-operator-h100-80gb" (dict "nodeSelector" (dict "nvidia.com/gpu.present" "true" "nvidia.com/gpu.product" "NVIDIA-H100-80GB-HBM3"))
-}}
{{- toYaml $pools -}}
{{- end -}}

{{/* The selected preset as a YAML dict with all four keys present. */}}
{{- define "sam-train.nodePool" -}}
{{- $pools := include "sam-train.nodePools" . | fromYaml -}}
{{- $name := .Values.nodePool.preset -}}
{{- if not (hasKey $pools $name) -}}
  {{- fail (printf "nodePool.preset %q is unknown; one of: %s" $name (keys $pools | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $p := get $pools $name -}}
{{- toYaml (dict
  "nodeSelector" (get $p "nodeSelector" | default (dict))
  "tolerations" (get $p "tolerations" | default (list))
  "extraResources" (get $p "extraResources" | default (dict))
  "env" (get $p "env" | default (dict))) -}}
{{- end -}}
