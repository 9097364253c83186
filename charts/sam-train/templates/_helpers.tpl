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
A name that is too long fails instead of being cut: two long release names cut to the same
40 characters would share a job, its Services and its checkpoints' run label.
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
    {{- $full = .Release.Name -}}
  {{- else -}}
    {{- $full = printf "%s-%s" .Release.Name $name -}}
  {{- end -}}
  {{- if gt (len $full) 40 -}}
    {{- fail (printf "the release name %q gives the full name %q, %d characters long; at most 40 are allowed (pod names like <name>-worker-31 must stay DNS labels): choose a shorter release name, one that contains %q (then used as is), or set fullnameOverride" .Release.Name $full (len $full) $name) -}}
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

{{/*
training.extraArgs as a dict `section.key` -> value text (the last `--set` of a key wins, as in
the trainer). Returned as JSON: `include "sam-train.extraSets" . | fromJson`.
*/}}
{{- define "sam-train.extraSets" -}}
{{- $out := dict -}}
{{- range .Values.training.extraArgs -}}
  {{- $parts := splitn "=" 2 (toString .) -}}
  {{- $_ := set $out (trim $parts._0) (toString $parts._1) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
A trainer setting as the pod's trainer resolves it, from the values: training.extraArgs (`--set`)
over training.config; "" when neither sets it (the preset's value applies). Call with
(list $ "section" "key").
*/}}
{{- define "sam-train.setting" -}}
{{- $ := index . 0 -}}
{{- $section := index . 1 -}}
{{- $key := index . 2 -}}
{{- $sets := include "sam-train.extraSets" $ | fromJson -}}
{{- $table := get (default (dict) $.Values.training.config) $section | default (dict) -}}
{{- if hasKey $sets (printf "%s.%s" $section $key) -}}
{{- get $sets (printf "%s.%s" $section $key) -}}
{{- else if and (kindIs "map" $table) (hasKey $table $key) -}}
{{- include "sam-train.scalarText" (get $table $key) -}}
{{- end -}}
{{- end -}}

{{/* A scalar value as plain text (a whole float as an integer, as the TOML writer writes it). */}}
{{- define "sam-train.scalarText" -}}
{{- if or (kindIs "float64" .) (kindIs "float32" .) -}}
  {{- if eq (float64 .) (floor .) -}}{{- printf "%d" (int64 .) -}}{{- else -}}{{- toJson . -}}{{- end -}}
{{- else -}}
  {{- toString . -}}
{{- end -}}
{{- end -}}

{{/*
The `run` label of the trainer's metrics (trainer/prom.py): metrics.run_name (training.extraArgs
over training.config), else the pod's SAM_RUN_NAME (the chart sets the full name; an `env`
entry may replace it), else the full name. The alerts and NOTES select by it.
*/}}
{{- define "sam-train.runLabel" -}}
{{- $name := include "sam-train.setting" (list . "metrics" "run_name") -}}
{{- if not $name -}}
  {{- range .Values.env -}}
    {{- if and (eq (toString .name) "SAM_RUN_NAME") (hasKey . "value") -}}
      {{- $name = toString .value -}}
    {{- end -}}
  {{- end -}}
{{- end -}}
{{- default (include "sam-train.fullname" .) $name -}}
{{- end -}}

{{/*
A Kubernetes quantity as a number, written with %g (parse it back with float64): `8`, `500m`
(milli), `64Gi` (binary: Ki Mi Gi Ti Pi Ei), `1G` (decimal: n u m k M G T P E), `1e3`, `1.5Gi`.
Call with (list VALUE "the.value.name"); fails naming the value when it is no quantity.
*/}}
{{- define "sam-train.quantity" -}}
{{- $text := toString (index . 0) -}}
{{- $path := index . 1 -}}
{{- $number := "^\\+?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)" -}}
{{- if not (regexMatch (printf "%s(([KMGTPE]i)|[numkMGTPE]|[eE][-+]?[0-9]+)?$" $number) $text) -}}
  {{- fail (printf "%s %q is not a Kubernetes quantity (e.g. 8, 500m, 64Gi, 1G)" $path $text) -}}
{{- end -}}
{{- $digits := regexReplaceAll (printf "%s(.*)$" $number) $text "${1}" -}}
{{- $suffix := regexReplaceAll (printf "%s(.*)$" $number) $text "${3}" -}}
{{- $factors := dict "" 1.0 "n" 1e-9 "u" 1e-6 "m" 1e-3 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18
  "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- if hasKey $factors $suffix -}}
  {{- printf "%g" (mulf (float64 $digits) (get $factors $suffix)) -}}
{{- else -}}
  {{- /* An exponent (`1e3`): strconv parses the whole text. */ -}}
  {{- printf "%g" (float64 (trimPrefix "+" $text)) -}}
{{- end -}}
{{- end -}}
