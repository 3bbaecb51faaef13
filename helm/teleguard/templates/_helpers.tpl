{{/* The chart name. */}}
{{- define "teleguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name prefix of every resource. */}}
{{- define "teleguard.fullname" -}}
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

{{/* Labels of every resource. */}}
{{- define "teleguard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "teleguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: teleguard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The labels KServe puts on the detector's pods: what the PodMonitor, PDB and NetworkPolicy select. */}}
{{- define "teleguard.predictorSelector" -}}
serving.kserve.io/inferenceservice: {{ .Values.serving.name }}
component: predictor
{{- end }}

{{/* The detector's ServiceAccount. */}}
{{- define "teleguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "teleguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace of the Kubeflow pipeline objects (a profile namespace). */}}
{{- define "teleguard.pipelinesNamespace" -}}
{{- default .Release.Namespace .Values.pipelines.namespace }}
{{- end }}

{{/* An image reference: repository@digest when a digest is given, else repository:tag. */}}
{{- define "teleguard.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/* The S3 endpoint as a URL. */}}
{{- define "teleguard.s3Url" -}}
{{- printf "%s://%s" (ternary "https" "http" .Values.storage.useHttps) .Values.storage.endpoint }}
{{- end }}

{{/* Whether the chart runs its own Redis for the session store. */}}
{{- define "teleguard.redisBundled" -}}
{{- if and .Values.serving.enabled (eq .Values.serving.sessionStore.type "redis") (not .Values.serving.sessionStore.existingSecret) }}true{{ end }}
{{- end }}

{{/* The name of the chart's Redis (StatefulSet, Service, NetworkPolicy). */}}
{{- define "teleguard.redisName" -}}
{{- printf "%s-redis" (include "teleguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels of the chart's Redis pod. */}}
{{- define "teleguard.redisSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: session-store
{{- end }}
