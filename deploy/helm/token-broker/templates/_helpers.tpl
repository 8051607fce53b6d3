{{/*
Names and labels, in the usual shape of `helm create` charts.
*/}}
{{- define "token-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name; kept to 45 characters so "<fullname>-redis-headless" stays a valid DNS label. */}}
{{- define "token-broker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "token-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "token-broker.labels" -}}
helm.sh/chart: {{ include "token-broker.chart" . }}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: token-broker
{{- end }}

{{- define "token-broker.brokerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end }}

{{- define "token-broker.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "token-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "token-broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "token-broker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding idp-client-secret and sealing-keys. */}}
{{- define "token-broker.secretName" -}}
{{- default (include "token-broker.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "token-broker.redisName" -}}
{{- printf "%s-redis" (include "token-broker.fullname" .) }}
{{- end }}

{{- define "token-broker.redisSecretName" -}}
{{- default (printf "%s-redis" (include "token-broker.fullname" .)) .Values.redis.bundled.auth.existingSecret }}
{{- end }}

{{/* URL of bundled Redis node i: a stable name through the headless Service. */}}
{{- define "token-broker.redisNodeUrl" -}}
{{- $root := index . 0 }}
{{- $i := index . 1 }}
{{- $name := include "token-broker.redisName" $root }}
{{- printf "redis://%s-%d.%s-headless.%s.svc.%s:6379" $name $i $name $root.Release.Namespace $root.Values.clusterDomain }}
{{- end }}

{{/*
The Secret key holding the Redis password, as YAML (name, key), mounted as TB_REDIS_PASSWORD_FILE;
empty without one (external Redis with no passwordSecret). URLs never carry the password: an old
$(TB_REDIS_PASSWORD) in an external URL fails the install with what to do instead.
*/}}
{{- define "token-broker.redisPasswordSecret" -}}
{{- if eq .Values.redis.mode "bundled" }}
name: {{ include "token-broker.redisSecretName" . }}
key: redis-password
{{- else }}
{{- range $url := prepend .Values.redis.external.redlockUrls (default "" .Values.redis.external.stateUrl) }}
{{- if contains "$(TB_REDIS_PASSWORD)" $url }}
{{- fail "redis.external URLs must not carry $(TB_REDIS_PASSWORD): name the Secret in redis.external.passwordSecret, which the broker reads as the file TB_REDIS_PASSWORD_FILE and puts into every URL" }}
{{- end }}
{{- end }}
{{- with .Values.redis.external.passwordSecret }}
{{- if .name }}
name: {{ .name }}
key: {{ .key }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Seconds the broker may take after SIGTERM: finish an in-flight rotation (IdP call, then store
retries under the lock), end streams and wait TB_SHUTDOWN_GRACE_MS for calls, plus 10 s for
taking the lock and closing Redis connections. An explicit value below that fails the install.
*/}}
{{- define "token-broker.terminationGracePeriodSeconds" -}}
{{- $ms := add .Values.idp.timeoutMs .Values.broker.persistRetryMs .Values.broker.shutdownGraceMs }}
{{- $minimum := add (div (add $ms 999) 1000) 10 }}
{{- $set := .Values.broker.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $set }}
{{- $minimum }}
{{- else if lt (int $set) (int $minimum) }}
{{- fail (printf "broker.terminationGracePeriodSeconds (%d) must be at least %d: idp.timeoutMs + broker.persistRetryMs + broker.shutdownGraceMs, rounded up, plus 10 s" (int $set) (int $minimum)) }}
{{- else }}
{{- int $set }}
{{- end }}
{{- end }}

{{- define "token-broker.redlockUrls" -}}
{{- $urls := list }}
{{- range $i := until (int .Values.redis.bundled.replicas) }}
{{- $urls = append $urls (include "token-broker.redisNodeUrl" (list $ $i)) }}
{{- end }}
{{- join "," $urls }}
{{- end }}

{{/* OpenTelemetry SDK settings, by the standard OTEL_* variables. */}}
{{- define "token-broker.otelEnv" -}}
{{- if or .Values.otel.enabled .Values.metrics.enabled }}
- name: OTEL_SERVICE_NAME
  value: {{ .Values.otel.serviceName | quote }}
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NAMESPACE_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=$(K8S_NAMESPACE_NAME)%s" (ternary (printf ",%s" .Values.otel.resourceAttributes) "" (ne .Values.otel.resourceAttributes "")) | quote }}
{{- else }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- end }}
{{- if .Values.otel.enabled }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.otel.protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .Values.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.otel.samplerArg | quote }}
{{- with .Values.otel.clientSpans }}
- name: TB_TRACE_CLIENT_SPANS
  value: {{ join "," . | quote }}
{{- end }}
{{- else }}
- name: OTEL_TRACES_EXPORTER
  value: none
{{- end }}
{{- if .Values.metrics.enabled }}
- name: OTEL_METRICS_EXPORTER
  value: prometheus
- name: OTEL_EXPORTER_PROMETHEUS_HOST
  value: 0.0.0.0
- name: OTEL_EXPORTER_PROMETHEUS_PORT
  value: {{ .Values.metrics.port | quote }}
{{- else }}
- name: OTEL_METRICS_EXPORTER
  value: none
{{- end }}
- name: OTEL_LOGS_EXPORTER
  value: none
{{- end }}

{{/* "true" when the broker authenticates to an OAuth2 IdP with a client secret. */}}
{{- define "token-broker.usesClientSecret" -}}
{{- if and (not .Values.idps) (eq .Values.idp.type "oauth2") (ne .Values.idp.authMethod "none") }}true{{ end }}
{{- end }}

{{/* Where the server certificate comes from: certManager, existingSecret or generated. */}}
{{- define "token-broker.tlsSource" -}}
{{- if .Values.tls.certManager.issuerRef.name }}certManager
{{- else if .Values.tls.existingSecret }}existingSecret
{{- else }}generated
{{- end }}
{{- end }}

{{/* The kubernetes.io/tls Secret the broker mounts. */}}
{{- define "token-broker.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "token-broker.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* Every DNS name a sidecar or client may dial: both Services, short to fully qualified. */}}
{{- define "token-broker.tlsDnsNames" -}}
{{- $names := list }}
{{- range $service := list (include "token-broker.fullname" .) (printf "%s-headless" (include "token-broker.fullname" .)) }}
{{- $names = concat $names (list $service (printf "%s.%s" $service $.Release.Namespace) (printf "%s.%s.svc" $service $.Release.Namespace) (printf "%s.%s.svc.%s" $service $.Release.Namespace $.Values.clusterDomain)) }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* "true" when the broker verifies callers with keys fetched by OIDC discovery from the issuer. */}}
{{- define "token-broker.authDiscovery" -}}
{{- if and .Values.auth.enabled (not .Values.auth.jwksFile) (not .Values.auth.jwksConfigMap) }}true{{ end }}
{{- end }}

{{/* The ConfigMap holding jwks.json, when the keys come from a file instead of discovery. */}}
{{- define "token-broker.jwksConfigMapName" -}}
{{- if .Values.auth.jwksConfigMap }}{{ .Values.auth.jwksConfigMap }}
{{- else if .Values.auth.jwksFile }}{{ printf "%s-jwks" (include "token-broker.fullname" .) }}
{{- end }}
{{- end }}

{{- define "token-broker.webhookName" -}}
{{- printf "%s-webhook" (include "token-broker.fullname" .) }}
{{- end }}

{{- define "token-broker.webhookSelectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end }}

{{/* The webhook's Service, as the API server dials it (and as its certificate names it). */}}
{{- define "token-broker.webhookDnsNames" -}}
{{- $service := include "token-broker.webhookName" . }}
{{- toJson (list $service (printf "%s.%s" $service .Release.Namespace) (printf "%s.%s.svc" $service .Release.Namespace) (printf "%s.%s.svc.%s" $service .Release.Namespace .Values.clusterDomain)) }}
{{- end }}

{{/* The injected sidecar's settings (the library chart's tokenBroker keys), as JSON: this
release's address, CA and audience, then webhook.sidecar over them. */}}
{{- define "token-broker.webhookSidecarSettings" -}}
{{- $fullname := include "token-broker.fullname" . }}
{{- if hasKey .Values.webhook.sidecar "brokerAddress" }}
{{- fail "webhook.sidecar.brokerAddress is set by the chart (this release's headless Service)" }}
{{- end }}
{{- $tls := dict "enabled" .Values.tls.enabled "caConfigMap" (ternary (printf "%s-ca" $fullname) "" .Values.tls.enabled) }}
{{- $computed := dict "brokerAddress" (printf "dns:///%s-headless.%s.svc.%s:50051" $fullname .Release.Namespace .Values.clusterDomain) "tls" $tls "serviceAccountToken" (dict "audience" .Values.auth.audience) }}
{{- toJson (mustMergeOverwrite $computed (deepCopy .Values.webhook.sidecar)) }}
{{- end }}

{{/* The projected-volume sources of the idps' client secrets (file = the IdP's name). */}}
{{- define "token-broker.idpSecretSources" -}}
{{- range $idp := .Values.idps }}
{{- with $idp.clientSecretRef }}
- secret:
    name: {{ .name }}
    items:
      - key: {{ .key }}
        path: {{ $idp.name }}
{{- end }}
{{- end }}
{{- end }}

{{/* Bundled state store: a master and 2 replicas with a sentinel each ("<fullname>-state"). */}}
{{- define "token-broker.stateName" -}}
{{- printf "%s-state" (include "token-broker.fullname" .) }}
{{- end }}

{{- define "token-broker.stateSelectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis-state
{{- end }}

{{/* Stable DNS name of bundled state pod i. */}}
{{- define "token-broker.stateHost" -}}
{{- $root := index . 0 }}
{{- $name := include "token-broker.stateName" $root }}
{{- printf "%s-%d.%s-headless.%s.svc.%s" $name (index . 1) $name $root.Release.Namespace $root.Values.clusterDomain }}
{{- end }}

{{/* TB_REDIS_SENTINELS of the bundled state store. */}}
{{- define "token-broker.stateSentinels" -}}
{{- $list := list }}
{{- range $i := until 3 }}
{{- $list = append $list (printf "%s:26379" (include "token-broker.stateHost" (list $ $i))) }}
{{- end }}
{{- join "," $list }}
{{- end }}

{{/*
The external state store's shape: url, sentinel or cluster; exactly one must be given.
*/}}
{{- define "token-broker.externalShape" -}}
{{- $e := .Values.redis.external }}
{{- $shapes := list }}
{{- if $e.stateUrl }}{{- $shapes = append $shapes "url" }}{{- end }}
{{- if $e.sentinels }}{{- $shapes = append $shapes "sentinel" }}{{- end }}
{{- if $e.clusterNodes }}{{- $shapes = append $shapes "cluster" }}{{- end }}
{{- if ne (len $shapes) 1 }}
{{- fail "redis.external: give the state store one way: stateUrl, sentinels (with sentinelMaster) or clusterNodes" }}
{{- end }}
{{- if and (ne (first $shapes) "url") (not $e.redlockUrls) }}
{{- fail "redis.external.redlockUrls is required with sentinels or clusterNodes: locks live on independent masters, not on the replicated state store" }}
{{- end }}
{{- first $shapes }}
{{- end }}
