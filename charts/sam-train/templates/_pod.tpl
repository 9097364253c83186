{{/*
The pod of one training node, built once and used by the PyTorchJob (both replica types),
the chart's TrainingRuntime and the TrainJob's runtimePatches.

"sam-train.pod" returns a YAML dict of the pieces; "sam-train.podTemplate" writes a whole
PodTemplateSpec from them. The pieces:
  labels, annotations, serviceAccountName, nodeSelector, tolerations, affinity,
  priorityClassName, schedulerName, imagePullSecrets, securityContext,
  terminationGracePeriodSeconds, volumes, command, ports, resources, env, volumeMounts,
  containerSecurityContext.
*/}}

{{/* "true" when the pods get GPUs. */}}
{{- define "sam-train.gpu" -}}
{{- if gt (int .Values.gpusPerNode) 0 -}}true{{- end -}}
{{- end -}}

{{/*
`python -m trainer.dist [--rdzv-conf=join_timeout=N,timeout=N] [--max-restarts N] -m trainer.train
--config FILE [--set X ...]`. No other rendezvous flags: torchrun reads the operator's PET_*
variables as flag defaults. The rendezvous timeout (training.rendezvousTimeoutSeconds: how long
each pod's torchrun waits for all pods of the job) is a flag of non-elastic jobs and TrainJobs;
an elastic PyTorchJob carries it in elasticPolicy.rdzvConf, which the operator passes as
PET_RDZV_CONF (a flag would replace that whole variable).
*/}}
{{- define "sam-train.command" -}}
{{- $cmd := list "python" "-m" "trainer.dist" -}}
{{- if not .Values.elastic.enabled -}}
  {{- $timeout := int .Values.training.rendezvousTimeoutSeconds -}}
  {{- $cmd = append $cmd (printf "--rdzv-conf=join_timeout=%d,timeout=%d" $timeout $timeout) -}}
{{- end -}}
{{- if gt (int .Values.training.maxRestarts) 0 -}}
  {{- $cmd = concat $cmd (list "--max-restarts" (toString (int .Values.training.maxRestarts))) -}}
{{- end -}}
{{- $cmd = concat $cmd (list "-m" "trainer.train" "--config" "/etc/sam-train/config.toml") -}}
{{- range .Values.training.extraArgs -}}
  {{- $cmd = concat $cmd (list "--set" (toString .)) -}}
{{- end -}}
{{- toYaml (dict "command" $cmd) -}}
{{- end -}}

{{/*
SAM_SHUTDOWN_TIMEOUT_S: the seconds the pod's torchrun wrapper gives its workers after SIGTERM
to finish the step and write the checkpoint (torchrun's own 30 s is too short for ViT-H):
terminationGracePeriodSeconds - 15, leaving the wrapper time to exit before the SIGKILL, and at
least 5.
*/}}
{{- define "sam-train.shutdownTimeout" -}}
{{- max 5 (sub (int .Values.terminationGracePeriodSeconds) 15) -}}
{{- end -}}

{{/*
The container env: the chart's variables, then the node pool preset's, then `env`. A later
entry replaces an earlier one of the same name (so `env` can override anything).
*/}}
{{- define "sam-train.env" -}}
{{- $env := list
  (dict "name" "SAM_RUN_NAME" "value" (include "sam-train.fullname" .))
  (dict "name" "SAM_GCS_TOKEN" "value" (toString .Values.gcs.token)) -}}
{{- if .Values.gcs.emulatorHost -}}
  {{- $env = append $env (dict "name" "STORAGE_EMULATOR_HOST" "value" .Values.gcs.emulatorHost) -}}
  {{- /* gcsfs probes each bucket over gRPC and waits 60 s per call against an emulator. */ -}}
  {{- $env = append $env (dict "name" "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT" "value" "false") -}}
{{- end -}}
{{- $env = append $env (dict "name" "SAM_LOG_FORMAT" "value" "json") -}}
{{- $env = append $env (dict "name" "SAM_SHUTDOWN_TIMEOUT_S" "value" (include "sam-train.shutdownTimeout" .)) -}}
{{- if include "sam-train.gpu" . -}}
  {{- with .Values.nccl -}}
    {{- if .debug -}}
      {{- $env = append $env (dict "name" "NCCL_DEBUG" "value" (toString .debug)) -}}
    {{- end -}}
    {{- if .socketIfname -}}
      {{- $env = append $env (dict "name" "NCCL_SOCKET_IFNAME" "value" (toString .socketIfname)) -}}
    {{- end -}}
    {{- if .ibDisable -}}
      {{- $env = append $env (dict "name" "NCCL_IB_DISABLE" "value" "1") -}}
    {{- end -}}
    {{- if .asyncErrorHandling -}}
      {{- $env = append $env (dict "name" "TORCH_NCCL_ASYNC_ERROR_HANDLING" "value" "1") -}}
    {{- end -}}
    {{- range $k := keys (default (dict) .extraEnv) | sortAlpha -}}
      {{- $env = append $env (dict "name" $k "value" (toString (get $.Values.nccl.extraEnv $k))) -}}
    {{- end -}}
  {{- end -}}
{{- end -}}
{{- $pool := include "sam-train.nodePool" . | fromYaml -}}
{{- range $k := keys $pool.env | sortAlpha -}}
  {{- $env = append $env (dict "name" $k "value" (toString (get $pool.env $k))) -}}
{{- end -}}
{{- $env = concat $env (default (list) .Values.env) -}}
{{- /* Keep the last entry of each name. */ -}}
{{- $out := list -}}
{{- range $i, $e := $env -}}
  {{- $later := false -}}
  {{- range $j, $f := $env -}}
    {{- if and (gt $j $i) (eq (toString $f.name) (toString $e.name)) -}}
      {{- $later = true -}}
    {{- end -}}
  {{- end -}}
  {{- if not $later -}}
    {{- $out = append $out $e -}}
  {{- end -}}
{{- end -}}
{{- toYaml (dict "env" $out) -}}
{{- end -}}

{{/* requests and limits: the values, quoted, plus the GPUs and the node pool's extra resources (limits). */}}
{{- define "sam-train.resources" -}}
{{- $requests := dict -}}
{{- $limits := dict -}}
{{- range $k, $v := (get .Values.resources "requests" | default (dict)) -}}
  {{- $_ := set $requests $k (toString $v) -}}
{{- end -}}
{{- range $k, $v := (get .Values.resources "limits" | default (dict)) -}}
  {{- $_ := set $limits $k (toString $v) -}}
{{- end -}}
{{- if include "sam-train.gpu" . -}}
  {{- if or (hasKey $limits "nvidia.com/gpu") (hasKey $requests "nvidia.com/gpu") -}}
    {{- fail (printf "resources sets nvidia.com/gpu, which the chart sets from gpusPerNode (%d); remove it from resources" (int .Values.gpusPerNode)) -}}
  {{- end -}}
  {{- $_ := set $limits "nvidia.com/gpu" (toString (int .Values.gpusPerNode)) -}}
{{- end -}}
{{- $pool := include "sam-train.nodePool" . | fromYaml -}}
{{- range $k, $v := $pool.extraResources -}}
  {{- if not (hasKey $limits $k) -}}
    {{- $_ := set $limits $k (toString $v) -}}
  {{- end -}}
{{- end -}}
{{- $res := dict -}}
{{- if $requests -}}{{- $_ := set $res "requests" $requests -}}{{- end -}}
{{- if $limits -}}{{- $_ := set $res "limits" $limits -}}{{- end -}}
{{- toYaml (dict "resources" $res) -}}
{{- end -}}

{{/* The pieces of the pod (see the top of this file). Call with (dict "ctx" $ "kind" "pytorchjob"|"trainjob"). */}}
{{- define "sam-train.pod" -}}
{{- $ := .ctx -}}
{{- $v := $.Values -}}
{{- $pool := include "sam-train.nodePool" $ | fromYaml -}}
{{- $gpu := include "sam-train.gpu" $ -}}

{{- $labels := merge (include "sam-train.selectorLabels" $ | fromYaml) (default (dict) $v.podLabels) -}}
{{- $annotations := merge (dict
  "checksum/config" (include "sam-train.configToml" $ | sha256sum)
  "kubectl.kubernetes.io/default-container" (ternary "pytorch" "node" (eq .kind "pytorchjob")))
  (default (dict) $v.podAnnotations) -}}

{{- $nodeSelector := merge (default (dict) $v.nodePool.nodeSelector) $pool.nodeSelector -}}

{{- $tolerations := list -}}
{{- $candidates := $pool.tolerations -}}
{{- if $gpu -}}
  {{- $candidates = append $candidates (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
{{- $candidates = concat $candidates (default (list) $v.nodePool.tolerations) -}}
{{- $seen := dict -}}
{{- range $candidates -}}
  {{- $id := toJson . -}}
  {{- if not (hasKey $seen $id) -}}
    {{- $_ := set $seen $id true -}}
    {{- $tolerations = append $tolerations . -}}
  {{- end -}}
{{- end -}}

{{- $pullSecrets := list -}}
{{- range $v.image.pullSecrets -}}
  {{- if kindIs "string" . -}}
    {{- $pullSecrets = append $pullSecrets (dict "name" .) -}}
  {{- else -}}
    {{- $pullSecrets = append $pullSecrets . -}}
  {{- end -}}
{{- end -}}

{{- $volumes := list
  (dict "name" "dshm" "emptyDir" (dict "medium" "Memory" "sizeLimit" (toString $v.shmSize)))
  (dict "name" "config" "configMap" (dict "name" (printf "%s-config" (include "sam-train.fullname" $)))) -}}
{{- $volumes = concat $volumes (default (list) $v.extraVolumes) -}}
{{- $mounts := list
  (dict "name" "dshm" "mountPath" "/dev/shm")
  (dict "name" "config" "mountPath" "/etc/sam-train" "readOnly" true) -}}
{{- $mounts = concat $mounts (default (list) $v.extraVolumeMounts) -}}

{{- $ports := list -}}
{{- if eq .kind "pytorchjob" -}}
  {{- /* Declared so that the operator does not add it; MASTER_PORT/PET_MASTER_PORT point at it. */ -}}
  {{- $ports = append $ports (dict "name" "pytorchjob-port" "containerPort" 23456 "protocol" "TCP") -}}
{{- end -}}
{{- range (include "sam-train.metricsPorts" $ | fromYaml).ports -}}
  {{- $ports = append $ports (dict "name" .name "containerPort" .port "protocol" "TCP") -}}
{{- end -}}

{{- $pod := dict
  "labels" $labels
  "annotations" $annotations
  "serviceAccountName" (include "sam-train.serviceAccountName" $)
  "nodeSelector" $nodeSelector
  "tolerations" $tolerations
  "affinity" (default (dict) $v.nodePool.affinity)
  "priorityClassName" $v.nodePool.priorityClassName
  "schedulerName" (include "sam-train.schedulerName" $)
  "imagePullSecrets" $pullSecrets
  "securityContext" (default (dict) $v.podSecurityContext)
  "terminationGracePeriodSeconds" (int $v.terminationGracePeriodSeconds)
  "volumes" $volumes
  "command" (include "sam-train.command" $ | fromYaml).command
  "ports" $ports
  "resources" (include "sam-train.resources" $ | fromYaml).resources
  "env" (include "sam-train.env" $ | fromYaml).env
  "volumeMounts" $mounts
  "containerSecurityContext" (default (dict) $v.securityContext) -}}
{{- toYaml $pod -}}
{{- end -}}

{{/*
A PodTemplateSpec. Call with (dict "ctx" $ "kind" "pytorchjob"|"trainjob" "restartPolicy" ""|"Never"|"OnFailure").
The container is `pytorch` for a PyTorchJob (the operator's webhook requires that name) and
`node` in a TrainingRuntime (the torch runtime's trainer container).
*/}}
{{- define "sam-train.podTemplate" -}}
{{- $ := .ctx -}}
{{- $p := include "sam-train.pod" . | fromYaml -}}
metadata:
  labels:
    {{- toYaml $p.labels | nindent 4 }}
  annotations:
    {{- toYaml $p.annotations | nindent 4 }}
spec:
  {{- with (get . "restartPolicy") }}
  restartPolicy: {{ . }}
  {{- end }}
  serviceAccountName: {{ $p.serviceAccountName }}
  {{- with $p.schedulerName }}
  schedulerName: {{ . }}
  {{- end }}
  {{- with $p.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $p.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $p.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $p.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $p.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $p.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $p.terminationGracePeriodSeconds }}
  containers:
    - name: {{ ternary "pytorch" "node" (eq .kind "pytorchjob") }}
      image: {{ include "sam-train.image" $ | quote }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      command:
        {{- toYaml $p.command | nindent 8 }}
      {{- with $p.ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $p.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        {{- toYaml $p.env | nindent 8 }}
      volumeMounts:
        {{- toYaml $p.volumeMounts | nindent 8 }}
      {{- with $p.containerSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  volumes:
    {{- toYaml $p.volumes | nindent 4 }}
{{- end -}}
