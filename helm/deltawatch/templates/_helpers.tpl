{{/* The chart name, truncated to a DNS label. */}}
{{- define "deltawatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release-qualified name of every object. */}}
{{- define "deltawatch.fullname" -}}
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

{{- define "deltawatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "deltawatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deltawatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "deltawatch.labels" -}}
helm.sh/chart: {{ include "deltawatch.chart" . }}
{{ include "deltawatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: deltawatch
{{- end }}

{{- define "deltawatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "deltawatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "deltawatch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the bearer token. */}}
{{- define "deltawatch.tokenSecretName" -}}
{{- default (printf "%s-token" (include "deltawatch.fullname" .)) .Values.auth.token.existingSecret }}
{{- end }}

{{/* The kubernetes.io/tls Secret with the server certificate (yours, or cert-manager's). */}}
{{- define "deltawatch.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "deltawatch.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* The Secret holding the client CA for mutual TLS. */}}
{{- define "deltawatch.clientCASecretName" -}}
{{- default (include "deltawatch.tlsSecretName" .) .Values.tls.clientCA.existingSecret }}
{{- end }}

{{/* The release label kube-prometheus-stack selects monitors and rules by. */}}
{{- define "deltawatch.monitorLabels" -}}
release: {{ .Values.serviceMonitor.release | quote }}
{{- with .Values.serviceMonitor.additionalLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The scrape endpoint settings shared by the ServiceMonitor and the PodMonitor. */}}
{{- define "deltawatch.scrapeEndpoint" -}}
path: /metrics
interval: {{ .Values.serviceMonitor.interval }}
scrapeTimeout: {{ .Values.serviceMonitor.scrapeTimeout }}
honorLabels: {{ .Values.serviceMonitor.honorLabels }}
{{- if .Values.tls.enabled }}
scheme: https
tlsConfig:
  serverName: {{ default (printf "%s.%s.svc" (include "deltawatch.fullname" .) .Release.Namespace) .Values.tls.serverName }}
  ca:
    secret:
      name: {{ include "deltawatch.tlsSecretName" . }}
      key: ca.crt
{{- end }}
{{- if and .Values.auth.token.enabled .Values.auth.metricsRequireToken }}
authorization:
  type: Bearer
  credentials:
    name: {{ include "deltawatch.tokenSecretName" . }}
    key: {{ .Values.auth.token.secretKey }}
{{- end }}
{{- with .Values.serviceMonitor.metricRelabelings }}
metricRelabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.serviceMonitor.relabelings }}
relabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Fail early on contradictory values. */}}
{{- define "deltawatch.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (not .Values.tls.certManager.enabled) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt) or tls.certManager.enabled" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name (an Issuer or ClusterIssuer)" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.enabled) }}
{{- fail "tls.certManager.enabled issues a certificate for TLS: set tls.enabled too" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled (mutual TLS) needs tls.enabled" }}
{{- end }}
{{- if and .Values.auth.metricsRequireToken (not .Values.auth.token.enabled) }}
{{- fail "auth.metricsRequireToken needs auth.token.enabled" }}
{{- end }}
{{- end }}
