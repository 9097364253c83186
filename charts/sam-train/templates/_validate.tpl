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
  {{- /* Both would be torchrun's --max-restarts: the operator's PET_MAX_RESTARTS and the flag. */ -}}
  {{- if gt (int $v.training.maxRestarts) 0 -}}
    {{- fail (printf "training.maxRestarts (%d) with elastic.enabled=true: both are torchrun's --max-restarts (the operator passes elastic.maxRestarts as PET_MAX_RESTARTS); set elastic.maxRestarts and leave training.maxRestarts 0" (int $v.training.maxRestarts)) -}}
  {{- end -}}
{{- end -}}

{{- /* restartPolicy ExitCode with backoffLimit 0: training-operator v1.9 fails the job at the first
pod failure, a drain's 143 included; the chart's runtime (maxRestarts 0) the same. */ -}}
{{- if and (eq $v.restartPolicy "ExitCode") (eq (int $v.runPolicy.backoffLimit) 0) (or (not $trainjob) $own) -}}
  {{- fail "runPolicy.backoffLimit=0 with restartPolicy=ExitCode fails the run at the first pod failure, even a retryable one (143 after a node drain or preemption, 200 after a peer's loss): set runPolicy.backoffLimit >= 1, or restartPolicy=Never to fail at the first failure on purpose" -}}
{{- end -}}

{{- /* Values a TrainJob has no place for: refused instead of silently dropped. */ -}}
{{- if $trainjob -}}
  {{- if include "sam-train.isSet" (list $v.runPolicy "ttlSecondsAfterFinished") -}}
    {{- fail "runPolicy.ttlSecondsAfterFinished is PyTorchJob-only: a TrainJob (jobKind=trainjob) has no TTL; leave it null (delete finished TrainJobs with helm uninstall)" -}}
  {{- end -}}
  {{- if ne (toString $v.runPolicy.cleanPodPolicy) "Running" -}}
    {{- fail (printf "runPolicy.cleanPodPolicy=%s is PyTorchJob-only: a TrainJob (jobKind=trainjob) cleans its pods through the JobSet; leave it at its default (Running)" (toString $v.runPolicy.cleanPodPolicy)) -}}
  {{- end -}}
{{- end -}}

{{- /* The identity annotations live on the ServiceAccount the chart creates. */ -}}
{{- if not $v.serviceAccount.create -}}
  {{- range $key := list "gcpServiceAccount" "awsRoleArn" "annotations" -}}
    {{- if get $v.serviceAccount $key -}}
      {{- fail (printf "serviceAccount.%s is set but serviceAccount.create=false: the chart annotates only the ServiceAccount it creates; annotate your account %q yourself and remove serviceAccount.%s, or set serviceAccount.create=true" $key (include "sam-train.serviceAccountName" $) $key) -}}
    {{- end -}}
  {{- end -}}
{{- end -}}

{{- /* The image: the tag or digest goes in image.tag (the chart appends `:<tag>`). */ -}}
{{- $repo := toString $v.image.repository -}}
{{- if contains "@" $repo -}}
  {{- fail (printf "image.repository %q contains a digest: set image.repository to the part before '@' and image.tag to the sha256:... digest" $repo) -}}
{{- else if regexMatch ":[^/]*$" $repo -}}
  {{- fail (printf "image.repository %q contains a tag (after its last '/'): set image.repository=%s and image.tag=%s" $repo (regexReplaceAll ":[^/]*$" $repo "") (regexReplaceAll "^.*:" $repo "")) -}}
{{- end -}}

{{- /* Resources: /dev/shm is memory-backed and counts against the container's memory limit. */ -}}
{{- $requests := get $v.resources "requests" | default (dict) -}}
{{- $limits := get $v.resources "limits" | default (dict) -}}
{{- $shm := float64 (include "sam-train.quantity" (list $v.shmSize "shmSize")) -}}
{{- if lt $shm 1048576.0 -}}
  {{- fail (printf "shmSize %v is below 1Mi: data loader workers pass batches through /dev/shm (e.g. 16Gi)" $v.shmSize) -}}
{{- end -}}
{{- if not (get $limits "memory") -}}
  {{- fail (printf "resources.limits.memory is required: /dev/shm (shmSize %v) is memory-backed and counts against it, and without a limit a filling /dev/shm is bounded by nothing but the node (e.g. --set resources.limits.memory=128Gi)" $v.shmSize) -}}
{{- end -}}
{{- $memLimit := float64 (include "sam-train.quantity" (list (get $limits "memory") "resources.limits.memory")) -}}
{{- if ge $shm $memLimit -}}
  {{- fail (printf "shmSize %v must be below resources.limits.memory %v: /dev/shm counts against the container's memory limit, so the training processes would have nothing left (OOM kill, exit 137)" $v.shmSize (get $limits "memory")) -}}
{{- end -}}
{{- range $name := list "cpu" "memory" "ephemeral-storage" -}}
  {{- if and (get $requests $name) (get $limits $name) -}}
    {{- $req := float64 (include "sam-train.quantity" (list (get $requests $name) (printf "resources.requests.%s" $name))) -}}
    {{- $lim := float64 (include "sam-train.quantity" (list (get $limits $name) (printf "resources.limits.%s" $name))) -}}
    {{- if gt $req $lim -}}
      {{- fail (printf "resources.requests.%s (%v) exceeds resources.limits.%s (%v): the API server rejects such pods" $name (get $requests $name) $name (get $limits $name)) -}}
    {{- end -}}
  {{- end -}}
{{- end -}}

{{- /* training.extraArgs (`--set`, applied last) may not override the keys the chart sets. */ -}}
{{- $owned := dict "data.shards" "training.dataShards" "train.run_dir" "training.runDir" "checkpoint.url" "training.checkpointUrl" "metrics.port" "monitoring.port" -}}
{{- range $arg := $v.training.extraArgs -}}
  {{- $key := trim (first (splitList "=" (toString $arg))) -}}
  {{- if hasKey $owned $key -}}
    {{- fail (printf "training.extraArgs %q sets %s, which the chart sets from %s: set %s instead and remove it from training.extraArgs" (toString $arg) $key (get $owned $key) (get $owned $key)) -}}
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
