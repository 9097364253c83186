{{/*
Names, labels and small derived values shared by every template.
*/}}

{{/* The chart name (nameOverride wins), as a DNS label. */}}
{{- define "sam-train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name of every object: fullnameOverride, else the release name, else
`<release>-<chart name>`. At most 40 characters so that pod names (`<name>-worker-31`,
`<name>-node-0-12-abcde`) and the operator's Service names stay DNS-1035 labels (63).
An override that is too long fails instead of being cut (a cut name could collide).
*/}}
{{- define "sam-train.fullname" -}}
{{- $full := "" -}}
{{- if .Values.fullnameOverride -}}
  {{- if gt (len .Values.fullnameOverride) 40 -}}
    {{- fail (printf "fullnameOverride %q is %d characters long; at most 40 are allowed (pod names like <name>-worker-31 must stay DNS labels)" .Values.fullnameOverride (len .Values.fullnameOverride)) -}}
  {{- end -}}
  {{- $full = .Values.fullnameOverride -}}
{{- else -}}
  {{- $name := include "sam-train.name" . -}}
  {{- if contains $name .Release.Name -}}
    {{- $full = .Release.Name | trunc 40 | trimSuffix "-" -}}
  {{- else -}}
    {{- $full = printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
  {{- end -}}
{{- end -}}
{{- /* Service and TrainJob names must be DNS-1035 labels: no dots, start with a letter. */ -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $full) -}}
  {{- fail (printf "the full name %q (from the release name or fullnameOverride) must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter; set fullnameOverride" $full) -}}
{{- end -}}
{{- $full -}}
{{- end -}}

{{/* `<name>-<version>` for the helm.sh/chart label. */}}
{{- define "sam-train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Standard labels. Call with (dict "ctx" $ "component" "trainer").
*/}}
{{- define "sam-train.labels" -}}
{{- $ctx := .ctx -}}
helm.sh/chart: {{ include "sam-train.chart" $ctx }}
app.kubernetes.io/name: {{ include "sam-train.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Selector labels: on every pod template of the job; the PodMonitor selects by them.
*/}}
{{- define "sam-train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sam-train.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: trainer
{{- end -}}

{{/* Training processes per pod: one per GPU, else cpuProcessesPerNode. */}}
{{- define "sam-train.procsPerNode" -}}
{{- if gt (int .Values.gpusPerNode) 0 -}}
{{- int .Values.gpusPerNode -}}
{{- else -}}
{{- int .Values.cpuProcessesPerNode -}}
{{- end -}}
{{- end -}}

{{/* The trainer image: repository:tag (tag defaults to appVersion; a sha256: tag is a digest). */}}
{{- define "sam-train.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString -}}
{{- if hasPrefix "sha256:" $tag -}}
{{- printf "%s@%s" .Values.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount the pods run as. */}}
{{- define "sam-train.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sam-train.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The pods' scheduler: scheduling.schedulerName, else the gang scheduler's, else none. */}}
{{- define "sam-train.schedulerName" -}}
{{- if .Values.scheduling.schedulerName -}}
{{- .Values.scheduling.schedulerName -}}
{{- else if eq .Values.scheduling.gang "volcano" -}}
volcano
{{- else if eq .Values.scheduling.gang "scheduler-plugins" -}}
scheduler-plugins-scheduler
{{- end -}}
{{- end -}}

{{/*
Whether a TrainJob gets the chart's own namespaced TrainingRuntime ("true" or ""): asked for
with trainJob.createRuntime, and needed for gang scheduling (podGroupPolicy lives in the
runtime, not in the TrainJob).
*/}}
{{- define "sam-train.ownRuntime" -}}
{{- if and (eq .Values.jobKind "trainjob") (or .Values.trainJob.createRuntime (ne .Values.scheduling.gang "none")) -}}
true
{{- end -}}
{{- end -}}

{{/* Metrics container ports as a list of {name, port}: one per local rank (port + LOCAL_RANK). */}}
{{- define "sam-train.metricsPorts" -}}
{{- $ports := list -}}
{{- if gt (int .Values.monitoring.port) 0 -}}
  {{- range $i := until (int (include "sam-train.procsPerNode" .)) -}}
    {{- $ports = append $ports (dict "name" (printf "metrics-%d" $i) "port" (add (int $.Values.monitoring.port) $i)) -}}
  {{- end -}}
{{- end -}}
{{- toYaml (dict "ports" $ports) -}}
{{- end -}}

{{/* The pod-name regex of this job's pods (PyTorchJob <job>-master-0/-worker-N; JobSet <job>-node-0-0-xxxxx). */}}
{{- define "sam-train.podRegex" -}}
{{- printf "%s-(master|worker|node)-.*" (include "sam-train.fullname" .) -}}
{{- end -}}

{{/* "true" when the map (first item) holds the key (second) with a non-null value; Helm drops null values. */}}
{{- define "sam-train.isSet" -}}
{{- $m := index . 0 -}}
{{- $k := index . 1 -}}
{{- if and (hasKey $m $k) (not (kindIs "invalid" (get $m $k))) -}}true{{- end -}}
{{- end -}}

{{/*
Labels of a monitoring object: the standard ones, `release: <monitoring.prometheusRelease>` (what
the Prometheus or Grafana sidecar selects by) and the object's extra labels (which may replace
`release`, not the standard ones). Call with (dict "ctx" $ "extra" MAP).
*/}}
{{- define "sam-train.monitoringLabels" -}}
{{- $std := include "sam-train.labels" (dict "ctx" .ctx "component" "monitoring") | fromYaml -}}
{{- $labels := merge $std (default (dict) .extra) (dict "release" (toString .ctx.Values.monitoring.prometheusRelease)) -}}
{{- toYaml $labels -}}
{{- end -}}
