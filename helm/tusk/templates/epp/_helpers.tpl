{{- define "tusk.epp.fullname" -}}{{ include "tusk.fullname" . }}-epp{{- end }}

{{/* The picker's EndpointPickerConfig (tusk/config.py): epp.config with the chart's listen
address and ports over it. */}}
{{- define "tusk.epp.config" -}}
{{- $e := .Values.epp -}}
{{- $base := dict "host" "0.0.0.0" "port" (int $e.port) "metrics_port" (int $e.metricsPort) -}}
{{- toJson (mergeOverwrite (deepCopy $e.config) $base) }}
{{- end }}
