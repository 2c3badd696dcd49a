{{- define "tusk.epp.fullname" -}}{{ include "tusk.fullname" . }}-epp{{- end }}

{{/* The picker's EndpointPickerConfig (tusk/config.py): epp.config with the chart's listen
address and ports over it. */}}
{{- define "tusk.epp.config" -}}
{{- $e := .Values.epp -}}
{{- $base := dict "host" "0.0.0.0" "port" (int $e.port) "metrics_port" (int $e.metricsPort) -}}
{{- toJson (mergeOverwrite (deepCopy $e.config) $base) }}
{{- end }}

{{/* "true" when a model of epp.config finds its servers by kubernetes_selector: the picker then
lists and watches pods in the release namespace (and needs a token and a Role for it). */}}
{{- define "tusk.epp.watchesPods" -}}
{{- $watch := false -}}
{{- range .Values.epp.config.models }}{{ if .kubernetes_selector }}{{ $watch = true }}{{ end }}{{ end -}}
{{- if $watch }}true{{ end -}}
{{- end }}
