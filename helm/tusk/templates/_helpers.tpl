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

{{/* Name of a cluster-scoped object (ClusterRole, ClusterRoleBinding): it carries
the release namespace, so two releases of the same name in different namespaces never share one.
Call with (dict "ctx" $ "component" "operator"). */}}
{{- define "tusk.clusterScopedName" -}}
{{- printf "%s-%s-%s" .ctx.Release.Namespace (include "tusk.fullname" .ctx) .component | trunc 253 | trimSuffix "-" }}
{{- end }}

{{/* The worker image template handed to the operator (--worker-image): "<repository>-{flavor}:<tag>";
the operator puts cpu, cuda, rocm or xpu in place of {flavor} from each ModelDeployment's accelerator. */}}
{{- define "tusk.operator.workerImage" -}}
{{- $image := .Values.operator.workerImage -}}
{{- $tag := $image.tag | default .Values.image.tag | default .Chart.AppVersion -}}
{{- printf "%s-{flavor}:%s" $image.repository (toString $tag) }}
{{- end }}

{{/* The router's replica count: values when it is fixed. With the HPA on, the live Deployment's count
(so an upgrade never resets what the HPA chose, and switching the HPA on never drops the router to
the API server's default of 1), or minReplicas on first install and with `helm template`. */}}
{{- define "tusk.router.replicas" -}}
{{- $r := .Values.router -}}
{{- if $r.autoscaling.enabled -}}
{{- $live := lookup "apps/v1" "Deployment" .Release.Namespace (include "tusk.router.fullname" .) -}}
{{- $current := int (dig "spec" "replicas" 0 $live) -}}
{{- max $current (int $r.autoscaling.minReplicas) -}}
{{- else -}}
{{- int $r.replicas -}}
{{- end -}}
{{- end }}

{{/* Namespaces the operator watches when it is namespaced: the list, or the release namespace. */}}
{{- define "tusk.operator.namespaces" -}}
{{- $ns := .Values.operator.namespaces | default (list .Release.Namespace) -}}
{{- toJson (uniq $ns) }}
{{- end }}

{{/* The chart's KV tier URL (shown in NOTES for ModelDeployments to share): the managed tier, the external one, or none.
The router does not read the tier: tier contents reach its prefix index through the workers' KV events. */}}
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
{{- toJson (mergeOverwrite (deepCopy .Values.router.config) $base) }}
{{- end }}

{{/* "true" when the operator runs Lease-based leader election (--leader-elect): whenever it is switched
on, and always with more than one replica, since standbys must never reconcile. Empty otherwise. */}}
{{- define "tusk.operator.leaderElect" -}}
{{- $op := .Values.operator -}}
{{- if or $op.leaderElection.enabled (gt (int $op.replicas) 1) }}true{{ end -}}
{{- end }}
