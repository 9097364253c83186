{{/*
A small TOML writer for the trainer's config file.

Helm's toToml is not used on purpose: it writes every number of the values (float64 once
parsed from YAML/JSON) as a float (`max_iters = 90000.0`, which the trainer rejects for int
fields). Here:
  - strings go through toJson: a JSON string (escapes \" \\ \n \uXXXX) is a valid TOML basic string;
  - a number without a fractional part is written as an integer (the trainer accepts an int
    for a float field); others as toJson writes them (8e-05 / 0.0008 are valid TOML floats);
  - lists are TOML arrays (of scalars or lists); a map in a list is refused (no array of tables
    in the trainer's config);
  - maps are tables with dotted headers ([section], [section.sub]); scalar keys of a table come
    first, then its sub-tables, keys sorted;
  - null has no TOML form and is refused, naming the key (Helm itself drops a key whose value
    is null from the values, which keeps the preset's value).
*/}}

{{/* A key: bare when it is [A-Za-z0-9_-]+, else quoted. */}}
{{- define "sam-train.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}
{{- . -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{/* A value. Call with (dict "v" VALUE "path" "training.config.x.y"). */}}
{{- define "sam-train.toml.value" -}}
{{- $v := .v -}}
{{- if kindIs "string" $v -}}
  {{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
  {{- ternary "true" "false" $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
  {{- /* |v| < 2^53: the float holds the integer exactly and int64 cannot overflow. */ -}}
  {{- if and (eq (float64 $v) (floor $v)) (lt (float64 $v) 9007199254740992.0) (gt (float64 $v) -9007199254740992.0) -}}
    {{- printf "%d" (int64 $v) -}}
  {{- else -}}
    {{- toJson $v -}}
  {{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) -}}
  {{- printf "%d" $v -}}
{{- else if kindIs "slice" $v -}}
  {{- $items := list -}}
  {{- range $i, $item := $v -}}
    {{- if kindIs "map" $item -}}
      {{- fail (printf "%s[%d]: a table in a list has no place in the trainer's config (lists hold scalars)" $.path $i) -}}
    {{- end -}}
    {{- $items = append $items (include "sam-train.toml.value" (dict "v" $item "path" (printf "%s[%d]" $.path $i))) -}}
  {{- end -}}
  {{- printf "[%s]" (join ", " $items) -}}
{{- else if kindIs "invalid" $v -}}
  {{- fail (printf "%s: null has no TOML form; remove the key to keep the preset's value" .path) -}}
{{- else -}}
  {{- fail (printf "%s: cannot write a %s as TOML" .path (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{/*
A table's body and its sub-tables. Call with (dict "table" MAP "header" "data" "path" "training.config.data").
The header is the dotted TOML name of MAP ("" for the document root, which gets no header line).
*/}}
{{- define "sam-train.toml.table" -}}
{{- $table := .table -}}
{{- if .header }}

[{{ .header }}]
{{- end -}}
{{- range $key := keys $table | sortAlpha -}}
  {{- $v := get $table $key -}}
  {{- if not (kindIs "map" $v) }}
{{ include "sam-train.toml.key" $key }} = {{ include "sam-train.toml.value" (dict "v" $v "path" (printf "%s.%s" $.path $key)) }}
  {{- end -}}
{{- end -}}
{{- range $key := keys $table | sortAlpha -}}
  {{- $v := get $table $key -}}
  {{- if kindIs "map" $v -}}
    {{- $header := include "sam-train.toml.key" $key -}}
    {{- if $.header -}}
      {{- $header = printf "%s.%s" $.header $header -}}
    {{- end -}}
    {{- include "sam-train.toml.table" (dict "table" $v "header" $header "path" (printf "%s.%s" $.path $key)) -}}
  {{- end -}}
{{- end -}}
{{- end -}}

{{/*
The trainer's config.toml: `preset = "<training.preset>"`, then training.config merged with
the keys the chart owns. Precedence: the chart-owned keys come only from their chart values
(data.shards <- training.dataShards, train.run_dir <- training.runDir, checkpoint.url <-
training.checkpointUrl when set, metrics.port <- monitoring.port); training.config setting one of
them is refused (two sources for one setting would silently disagree, e.g. PodMonitor ports vs
the port the trainer serves). Everything else in training.config wins over the preset, and
training.extraArgs (`--set`) over the file.
*/}}
{{- define "sam-train.configToml" -}}
{{- $cfg := deepCopy (default (dict) .Values.training.config) -}}
{{- $owned := list
  (list "data" "shards" "training.dataShards")
  (list "train" "run_dir" "training.runDir")
  (list "checkpoint" "url" "training.checkpointUrl")
  (list "metrics" "port" "monitoring.port") -}}
{{- range $o := $owned -}}
  {{- $section := get $cfg (index $o 0) -}}
  {{- if and (kindIs "map" $section) (hasKey $section (index $o 1)) -}}
    {{- fail (printf "training.config.%s.%s is set by the chart from %s; set it there and remove training.config.%s.%s" (index $o 0) (index $o 1) (index $o 2) (index $o 0) (index $o 1)) -}}
  {{- end -}}
{{- end -}}
{{- range $name, $section := $cfg -}}
  {{- if not (kindIs "map" $section) -}}
    {{- fail (printf "training.config.%s must be a table (section -> key -> value), got %s" $name (kindOf $section)) -}}
  {{- end -}}
{{- end -}}
{{- $shards := required "training.dataShards is required: the SA-1B tar shards, e.g. --set training.dataShards='gs://bucket/sa1b/sa_*.tar'" .Values.training.dataShards -}}
{{- $runDir := required "training.runDir is required: the run directory on object storage, e.g. --set training.runDir=gs://bucket/runs/vit-h-1" .Values.training.runDir -}}
{{- $_ := set $cfg "data" (merge (dict "shards" $shards) (get $cfg "data" | default (dict))) -}}
{{- $_ = set $cfg "train" (merge (dict "run_dir" $runDir) (get $cfg "train" | default (dict))) -}}
{{- if .Values.training.checkpointUrl -}}
  {{- $_ = set $cfg "checkpoint" (merge (dict "url" .Values.training.checkpointUrl) (get $cfg "checkpoint" | default (dict))) -}}
{{- end -}}
{{- $_ = set $cfg "metrics" (merge (dict "port" (int .Values.monitoring.port)) (get $cfg "metrics" | default (dict))) -}}
# The trainer's config file (rendered by the sam-train chart). Precedence: the preset below <
# this file < the container's --set arguments (training.extraArgs).
preset = {{ toJson .Values.training.preset }}
{{- include "sam-train.toml.table" (dict "table" $cfg "header" "" "path" "training.config") }}
{{- end -}}
