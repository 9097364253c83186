{{/*
Cross-field rules that values.schema.json cannot express. Each message names the values
involved. Included once, by configmap.yaml (rendered for every release).
*/}}
{{- define "sam-train.validate" -}}
{{- $v := .Values -}}
{{- $trainjob := eq $v.jobKind "trainjob" -}}
{{- $own := include "sam-train.ownRuntime" . -}}
{{- $procs := int (include "sam-train.procsPerNode" .) -}}

{{- /* Elastic training exists only in PyTorchJob (Trainer v2 removed torch ElasticPolicy). */ -}}
{{- if $v.elastic.enabled -}}
  {{- if $trainjob -}}
    {{- fail "elastic.enabled=true needs jobKind=pytorchjob: Kubeflow Trainer v2 (TrainJob) has no elastic PyTorch training; set elastic.enabled=false or jobKind=pytorchjob" -}}
  {{- end -}}
  {{- if gt (int $v.elastic.minNodes) (int $v.nodes) -}}
    {{- fail (printf "elastic.minNodes (%d) must not exceed nodes (%d), the most Worker pods" (int $v.elastic.minNodes) (int $v.nodes)) -}}
  {{- end -}}
{{- end -}}

{{- /* Metrics ports: the PodMonitor scrapes ports that must exist. */ -}}
{{- if and $v.monitoring.podMonitor.enabled (eq (int $v.monitoring.port) 0) -}}
  {{- fail "monitoring.podMonitor.enabled=true needs monitoring.port > 0 (monitoring.port 0 turns the trainer's exporter off: nothing to scrape)" -}}
{{- end -}}
{{- if gt (add (int $v.monitoring.port) $procs -1) 65535 -}}
  {{- fail (printf "monitoring.port %d + %d local ranks exceeds port 65535" (int $v.monitoring.port) $procs) -}}
{{- end -}}

{{- /* Gang-scheduling knobs that only some gang schedulers read. */ -}}
{{- if and $v.scheduling.queue (ne $v.scheduling.gang "volcano") -}}
  {{- fail (printf "scheduling.queue %q is a Volcano queue and needs scheduling.gang=volcano (got %q)" $v.scheduling.queue $v.scheduling.gang) -}}
{{- end -}}
{{- if and (include "sam-train.isSet" (list $v.scheduling "scheduleTimeoutSeconds")) (eq $v.scheduling.gang "none") -}}
  {{- fail "scheduling.scheduleTimeoutSeconds is set but scheduling.gang is none: set scheduling.gang=volcano or scheduler-plugins, or leave it null" -}}
{{- end -}}
{{- if and $trainjob (ne $v.scheduling.gang "none") (include "sam-train.isSet" (list $v.scheduling "scheduleTimeoutSeconds")) (ne $v.scheduling.gang "scheduler-plugins") -}}
  {{- fail "scheduling.scheduleTimeoutSeconds with jobKind=trainjob exists only for scheduling.gang=scheduler-plugins (podGroupPolicy.coscheduling); Trainer's volcano policy has no timeout" -}}
{{- end -}}

{{- /* TrainJob: what the runtimePatches of Trainer v2.3 cannot carry (pod spec: affinity,
nodeSelector, tolerations, volumes, securityContext, serviceAccountName, imagePullSecrets,
terminationGracePeriodSeconds; container: env, volumeMounts, securityContext). */ -}}
{{- if and $trainjob (not $own) -}}
  {{- $hint := "; set trainJob.createRuntime=true: the chart then renders its own TrainingRuntime, where it has a place" -}}
  {{- if $v.nodePool.priorityClassName -}}
    {{- fail (printf "nodePool.priorityClassName has no place in a TrainJob's runtimePatches (runtime %s %q)%s" $v.trainJob.runtimeKind $v.trainJob.runtime $hint) -}}
  {{- end -}}
  {{- if $v.scheduling.schedulerName -}}
    {{- fail (printf "scheduling.schedulerName has no place in a TrainJob's runtimePatches (runtime %s %q)%s" $v.trainJob.runtimeKind $v.trainJob.runtime $hint) -}}
  {{- end -}}
  {{- if $v.monitoring.podMonitor.enabled -}}
    {{- fail (printf "monitoring.podMonitor.enabled=true with jobKind=trainjob needs the metrics container ports (metrics-0..), which a TrainJob's runtimePatches cannot declare (runtime %s %q)%s" $v.trainJob.runtimeKind $v.trainJob.runtime $hint) -}}
  {{- end -}}
{{- end -}}
{{- if and $own (eq $v.restartPolicy "Always") -}}
  {{- fail "restartPolicy=Always is not possible with jobKind=trainjob: the runtime's pods belong to batch Jobs (Never or OnFailure); use ExitCode, OnFailure or Never" -}}
{{- end -}}

{{- /* Every extra mount names a volume: the API server would reject the operator's pods later. */ -}}
{{- $volumes := list "dshm" "config" -}}
{{- range $v.extraVolumes -}}{{- $volumes = append $volumes .name -}}{{- end -}}
{{- range $i, $m := $v.extraVolumeMounts -}}
  {{- if not (has $m.name $volumes) -}}
    {{- fail (printf "extraVolumeMounts[%d].name %q names no volume: add it to extraVolumes (have: %s)" $i $m.name (join ", " $volumes)) -}}
  {{- end -}}
{{- end -}}

{{- /* Image-encoder initialisation: the trainer refuses a choice without its checkpoint (exit 2);
say so at install time instead of in a failed pod. */ -}}
{{- $model := default (dict) (get (default (dict) $v.training.config) "model") -}}
{{- $init := get $model "encoder_init" | default "" | toString -}}
{{- if and (eq $init "mae") (not (get $model "mae_checkpoint")) -}}
  {{- fail "training.config.model.mae_checkpoint is required with training.config.model.encoder_init=mae (the paper's init, e.g. gs://bucket/mae_pretrain_vit_huge.pth)" -}}
{{- end -}}
{{- if and (eq $init "sam") (not (get $model "init_checkpoint")) -}}
  {{- fail "training.config.model.init_checkpoint is required with training.config.model.encoder_init=sam (an official SAM .pth or one of our checkpoints)" -}}
{{- end -}}

{{- /* The config renders (required keys, chart-owned keys, TOML types): fail here, early. */ -}}
{{- $_ := include "sam-train.configToml" . -}}
{{- end -}}
