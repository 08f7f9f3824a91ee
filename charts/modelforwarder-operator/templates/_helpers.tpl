{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "mfo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the prefix of every object of the release. */}}
{{- define "mfo.fullname" -}}
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

{{- define "mfo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "mfo.labels" -}}
helm.sh/chart: {{ include "mfo.chart" . }}
{{ include "mfo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelforwarder
{{- end }}

{{/* Selector labels of the operator pods. */}}
{{- define "mfo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mfo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mfo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mfo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest. Usage: include "mfo.image" (list .Values.image .Chart.AppVersion) */}}
{{- define "mfo.image" -}}
{{- $img := index . 0 }}{{- $app := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $app $img.tag) }}
{{- end }}
{{- end }}

{{/*
The label selector of the forwarder pods the operator creates (see
docs/operator.md: every owned object carries these labels).
*/}}
{{- define "mfo.forwarderSelector" -}}
app.kubernetes.io/name: forwarder
app.kubernetes.io/managed-by: modelforwarder-operator
{{- end }}

{{/* The watched namespaces, comma-separated: watchNamespace, then
watchNamespaces, without repeats; empty: all namespaces. */}}
{{- define "mfo.watchNamespaces" -}}
{{- $ns := list -}}
{{- if .Values.watchNamespace }}{{ $ns = append $ns .Values.watchNamespace }}{{ end -}}
{{- range .Values.watchNamespaces }}{{ $ns = append $ns . }}{{ end -}}
{{- $ns | uniq | join "," -}}
{{- end }}

{{/* Namespaces to find forwarder pods in (for the PodMonitor). */}}
{{- define "mfo.forwarderNamespaces" -}}
{{- $watched := include "mfo.watchNamespaces" . }}
{{- if .Values.metrics.forwarderPodMonitor.namespaces }}
matchNames:
{{- range .Values.metrics.forwarderPodMonitor.namespaces }}
  - {{ . | quote }}
{{- end }}
{{- else if $watched }}
matchNames:
{{- range splitList "," $watched }}
  - {{ . | quote }}
{{- end }}
{{- else }}
any: true
{{- end }}
{{- end }}
