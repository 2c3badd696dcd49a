{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "tusk.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; suffixes such as "-operator" are added per component. */}}
{{- define "tusk.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "tusk.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "tusk.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "tusk.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. Call with (dict "ctx" $ "component" "router"). */}}
{{- define "tusk.labels" -}}
helm.sh/chart: {{ include "tusk.chart" .ctx }}
{{ include "tusk.selectorLabels" . }}
app.kubernetes.io/part-of: tusk
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Immutable selector labels (Deployment selectors never change across upgrades). */}}
{{- define "tusk.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "tusk-%s" .component }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* "repository:tag" with the tag defaulting to the chart-wide tag, then the appVersion. */}}
{{- define "tusk.image" -}}
{{- $tag := .image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- printf "%s:%s" .image.repository (toString $tag) }}
{{- end }}

{{- define "tusk.operator.fullname" -}}{{ include "tusk.fullname" . }}-operator{{- end }}
{{- define "tusk.router.fullname" -}}{{ include "tusk.fullname" . }}-router{{- end }}
{{- define "tusk.kvtier.fullname" -}}{{ include "tusk.fullname" . }}-kv{{- end }}

{{/* Namespaces the operator watches when it is namespaced: the list, or the release namespace. */}}
{{- define "tusk.operator.namespaces" -}}
{{- $ns := .Values.operator.namespaces | default (list .Release.Namespace) -}}
{{- toJson (uniq $ns) }}
{{- end }}

{{/* The KV tier URL the router uses for its shared index: the managed tier, the external one, or none. */}}
{{- define "tusk.kvtier.url" -}}
{{- if .Values.kvTier.managed -}}
{{- printf "redis://%s.%s.svc:%d/0" (include "tusk.kvtier.fullname" .) .Release.Namespace (int .Values.kvTier.port) }}
{{- else -}}
{{- .Values.kvTier.externalUrl }}
{{- end }}
{{- end }}

{{/* The router's RouterConfig (tusk/config.py) as a dict; values.router.config is merged over it. */}}
{{- define "tusk.router.config" -}}
{{- $base := dict "host" "0.0.0.0" "port" (int .Values.router.port) -}}
{{- $url := include "tusk.kvtier.url" . -}}
{{- if $url }}{{ $_ := set $base "kv_tier_url" $url }}{{ end -}}
{{- toJson (mergeOverwrite (deepCopy .Values.router.config) $base) }}
{{- end }}
