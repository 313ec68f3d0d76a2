{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "slipstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped full name. */}}
{{- define "slipstream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "slipstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "slipstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "slipstream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "slipstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "slipstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "slipstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "slipstream.image" -}}
{{- /* toString: `--set image.tag=1.2` gives a number */}}
{{- $tag := default .Chart.AppVersion (toString .Values.image.tag) }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Whether the access policy ConfigMap is rendered. */}}
{{- define "slipstream.hasPolicy" -}}
{{- if .Values.policy }}true{{ end }}
{{- end }}

{{/* Namespace of an optional monitoring object: its own value or the release's. */}}
{{- define "slipstream.monitoringNamespace" -}}
{{- default .root.Release.Namespace .namespace }}
{{- end }}

{{/*
Fails with a clear message when the PodDisruptionBudget could never allow an
eviction (JSON schema cannot compare two values).
*/}}
{{- define "slipstream.checkDisruptionBudget" -}}
{{- $pdb := .Values.podDisruptionBudget }}
{{- $replicas := int .Values.replicaCount }}
{{- if and $pdb.enabled (hasKey $pdb "minAvailable") }}
{{- $min := $pdb.minAvailable }}
{{- if kindIs "string" $min }}
{{- /* Kubernetes rounds a percentage of minAvailable up. */}}
{{- $pct := int (trimSuffix "%" $min) }}
{{- if ge (div (add (mul $pct $replicas) 99) 100) $replicas }}
{{- fail (printf "podDisruptionBudget.minAvailable %s of replicaCount %d rounds up to every replica, so no node running a replica could be drained: lower it or use maxUnavailable" $min $replicas) }}
{{- end }}
{{- else if ge (int $min) $replicas }}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be below replicaCount (%d), or no node running a replica could be drained" (int $min) $replicas) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Prometheus job of the operator's series: the ServiceMonitor names it after the Service. */}}
{{- define "slipstream.metricsJob" -}}
{{- include "slipstream.fullname" . }}-metrics
{{- end }}
