{{/*
The token-broker sidecar for a module's pods. Every template takes the module chart's root context
and reads .Values.tokenBroker (README.md, "Install with Helm", lists the keys). In a pod template:

  metadata.labels:      include "token-broker-sidecar.podLabels" .
  spec.initContainers:  include "token-broker-sidecar.initContainers" .   (native sidecar)
  spec.containers:      your module, with include "token-broker-sidecar.moduleEnv" . in its env
                        (and "token-broker-sidecar.moduleVolumeMounts" . with tokenDir), then
                        include "token-broker-sidecar.containers" .        (native: false)
  spec.volumes:         include "token-broker-sidecar.volumes" .
*/}}

{{/* The defaults of .Values.tokenBroker (test/helm checks that README documents each key). */}}
{{- define "token-broker-sidecar.defaults" -}}
brokerAddress: ""
native: true
image:
  repository: token-broker/sidecar
  tag: "0.1.0"
  pullPolicy: IfNotPresent
port: 8181
socket: ""
users: []
allowedUsers: []
maxUsers: null
safetySkewMs: null
tokenDir: ""
logLevel: info
env: {}
runAsUser: 1000
resources:
  requests:
    cpu: 20m
    memory: 64Mi
  limits:
    cpu: 500m
    memory: 128Mi
podLabels:
  token-broker.io/sidecar: "true"
serviceAccountToken:
  audience: token-broker
  expirationSeconds: 3600
tls:
  enabled: true
  caConfigMap: token-broker-ca
  serverName: ""
telemetry:
  enabled: false
  endpoint: ""
  protocol: grpc
  serviceName: token-broker-sidecar
  traces: true
  metrics: true
  sampler: parentbased_traceidratio
  samplerArg: "1.0"
{{- end }}

{{- define "token-broker-sidecar.config" -}}
{{- $defaults := include "token-broker-sidecar.defaults" . | fromYaml }}
{{- range $key, $_ := (default (dict) .Values.tokenBroker) }}
{{- if not (hasKey $defaults $key) }}
{{- fail (printf "tokenBroker.%s is not a sidecar setting (known: %s)" $key (keys $defaults | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- /* One level down too, for the groups of settings (not the free-form maps). */}}
{{- range $group := list "image" "serviceAccountToken" "tls" "telemetry" }}
{{- $given := index (default (dict) $.Values.tokenBroker) $group }}
{{- if kindIs "map" $given }}
{{- range $key, $_ := $given }}
{{- if not (hasKey (index $defaults $group) $key) }}
{{- fail (printf "tokenBroker.%s.%s is not a sidecar setting (known: %s)" $group $key (keys (index $defaults $group) | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $config := mustMergeOverwrite $defaults (deepCopy (default (dict) .Values.tokenBroker)) }}
{{- if not $config.brokerAddress }}
{{- fail "tokenBroker.brokerAddress is required: the broker's headless Service, e.g. dns:///token-broker-headless.token-broker.svc.cluster.local:50051 (the broker release's NOTES print it)" }}
{{- end }}
{{- if not (regexMatch "^(dns|ipv4|ipv6|unix):" $config.brokerAddress) }}
{{- if not (regexMatch "^[A-Za-z0-9.-]+:[0-9]+$" $config.brokerAddress) }}
{{- fail (printf "tokenBroker.brokerAddress must be dns:///host:port or host:port, got %q" $config.brokerAddress) }}
{{- end }}
{{- end }}
{{- range $pattern := $config.allowedUsers }}
{{- if not (regexMatch "^[^/,\\s]+/[^/,\\s]+$" (toString $pattern)) }}
{{- fail (printf "tokenBroker.allowedUsers: %q must be tenant/user (either part may use * as a glob)" (toString $pattern)) }}
{{- end }}
{{- end }}
{{- if not (kindIs "invalid" $config.maxUsers) }}
{{- if or (not (regexMatch "^[0-9]+$" (toString $config.maxUsers))) (lt (int64 $config.maxUsers) 1) }}
{{- fail (printf "tokenBroker.maxUsers must be a whole number of at least 1, got %v" $config.maxUsers) }}
{{- end }}
{{- end }}
{{- with $config.socket }}
{{- if or (not (regexMatch "^/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)+$" .)) (gt (len .) 107) (contains "/../" .) }}
{{- fail (printf "tokenBroker.socket must be an absolute file path in a directory (at most 107 bytes), got %q" .) }}
{{- end }}
{{- if eq (dir .) (trimSuffix "/" $config.tokenDir) }}
{{- fail "tokenBroker.socket must not be in tokenBroker.tokenDir (the module mounts that read-only)" }}
{{- end }}
{{- end }}
{{- if $config.telemetry.enabled }}
{{- if not $config.telemetry.endpoint }}
{{- fail "tokenBroker.telemetry.endpoint is required with tokenBroker.telemetry.enabled (the OTLP collector, e.g. http://otel-collector.observability.svc:4317)" }}
{{- end }}
{{- if not (has $config.telemetry.protocol (list "grpc" "http/protobuf" "http/json")) }}
{{- fail (printf "tokenBroker.telemetry.protocol must be grpc, http/protobuf or http/json, got %q" $config.telemetry.protocol) }}
{{- end }}
{{- end }}
{{- range $name, $_ := $config.env }}
{{- if not (hasPrefix "TB_SIDECAR_" $name) }}
{{- fail (printf "tokenBroker.env.%s: only TB_SIDECAR_* variables belong here" $name) }}
{{- end }}
{{- /* These have their own keys. */}}
{{- if has $name (list "TB_SIDECAR_BROKER_ADDRESS" "TB_SIDECAR_PORT" "TB_SIDECAR_LOG_LEVEL" "TB_SIDECAR_USERS" "TB_SIDECAR_SAFETY_SKEW_MS" "TB_SIDECAR_TOKEN_DIR" "TB_SIDECAR_SOCKET" "TB_SIDECAR_ALLOWED_USERS" "TB_SIDECAR_MAX_USERS" "TB_SIDECAR_BROKER_TLS" "TB_SIDECAR_BROKER_CA_FILE" "TB_SIDECAR_BROKER_SERVER_NAME" "TB_SIDECAR_TOKEN_FILE") }}
{{- fail (printf "tokenBroker.env.%s is set by the chart (use its tokenBroker key)" $name) }}
{{- end }}
{{- end }}
{{- toJson $config }}
{{- end }}

{{- define "token-broker-sidecar.podLabels" -}}
{{- $config := include "token-broker-sidecar.config" . | fromJson -}}
{{- toYaml $config.podLabels }}
{{- end }}

{{/* One HTTP GET of the sidecar's localhost API. It binds 127.0.0.1 (or a Unix socket) only, and
kubelet's httpGet probes go to the pod IP, so the probe runs inside the container with the image's
node: fetch for the port, node:http for the socket (fetch cannot dial one). */}}
{{- define "token-broker-sidecar.probe" -}}
{{- $config := index . 0 }}
{{- $path := index . 1 -}}
exec:
  command:
    - node
    - -e
    {{- if $config.socket }}
    - {{ printf "require('node:http').get({ socketPath: '%s', path: '%s', headers: { host: 'localhost' }, timeout: 2000 }, (r) => process.exit(r.statusCode === 200 ? 0 : 1)).on('timeout', () => process.exit(1)).on('error', () => process.exit(1))" $config.socket $path | quote }}
    {{- else }}
    - {{ printf "fetch('http://127.0.0.1:%d%s', { signal: AbortSignal.timeout(2000) }).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))" (int $config.port) $path | quote }}
    {{- end }}
{{- end }}

{{- define "token-broker-sidecar.container" -}}
{{- $config := include "token-broker-sidecar.config" . | fromJson -}}
- name: token-broker-sidecar
  image: {{ printf "%s:%s" $config.image.repository $config.image.tag }}
  imagePullPolicy: {{ $config.image.pullPolicy }}
  {{- if $config.native }}
  # A native sidecar: started (startupProbe passed) before the module, stopped after it.
  restartPolicy: Always
  {{- end }}
  env:
    - name: TB_SIDECAR_BROKER_ADDRESS
      value: {{ $config.brokerAddress | quote }}
    {{- if $config.socket }}
    - name: TB_SIDECAR_SOCKET
      value: {{ $config.socket | quote }}
    {{- else }}
    - name: TB_SIDECAR_PORT
      value: {{ $config.port | int | toString | quote }}
    {{- end }}
    - name: TB_SIDECAR_LOG_LEVEL
      value: {{ $config.logLevel | quote }}
    {{- with $config.users }}
    - name: TB_SIDECAR_USERS
      value: {{ join "," . | quote }}
    {{- end }}
    {{- if not (kindIs "invalid" $config.safetySkewMs) }}
    - name: TB_SIDECAR_SAFETY_SKEW_MS
      value: {{ $config.safetySkewMs | int64 | toString | quote }}
    {{- end }}
    {{- with $config.tokenDir }}
    - name: TB_SIDECAR_TOKEN_DIR
      value: {{ . | quote }}
    {{- end }}
    {{- with $config.allowedUsers }}
    - name: TB_SIDECAR_ALLOWED_USERS
      value: {{ join "," . | quote }}
    {{- end }}
    {{- if not (kindIs "invalid" $config.maxUsers) }}
    - name: TB_SIDECAR_MAX_USERS
      value: {{ $config.maxUsers | int64 | toString | quote }}
    {{- end }}
    # Read for every new stream and call: the kubelet rewrites it before it expires.
    - name: TB_SIDECAR_TOKEN_FILE
      value: /var/run/secrets/tokens/token-broker
    {{- if not $config.tls.enabled }}
    # Plaintext to the broker, as tokenBroker.tls.enabled false asks: not for production.
    - name: TB_SIDECAR_BROKER_TLS
      value: "off"
    {{- else }}
    {{- if $config.tls.caConfigMap }}
    - name: TB_SIDECAR_BROKER_CA_FILE
      value: /var/run/token-broker/ca/ca.crt
    {{- end }}
    {{- with $config.tls.serverName }}
    - name: TB_SIDECAR_BROKER_SERVER_NAME
      value: {{ . | quote }}
    {{- end }}
    {{- end }}
    {{- with $config.telemetry }}
    {{- if .enabled }}
    # OTLP export of the sidecar's traces and metrics (Prometheus cannot scrape 127.0.0.1).
    - name: OTEL_SERVICE_NAME
      value: {{ .serviceName | quote }}
    - name: K8S_POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: K8S_NAMESPACE_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    - name: OTEL_RESOURCE_ATTRIBUTES
      value: "k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=$(K8S_NAMESPACE_NAME)"
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: {{ .endpoint | quote }}
    - name: OTEL_EXPORTER_OTLP_PROTOCOL
      value: {{ .protocol | quote }}
    - name: OTEL_TRACES_EXPORTER
      value: {{ ternary "otlp" "none" .traces | quote }}
    - name: OTEL_METRICS_EXPORTER
      value: {{ ternary "otlp" "none" .metrics | quote }}
    - name: OTEL_TRACES_SAMPLER
      value: {{ .sampler | quote }}
    - name: OTEL_TRACES_SAMPLER_ARG
      value: {{ .samplerArg | toString | quote }}
    - name: OTEL_LOGS_EXPORTER
      value: "none"
    {{- end }}
    {{- end }}
    {{- range $name, $value := $config.env }}
    - name: {{ $name }}
      value: {{ $value | toString | quote }}
    {{- end }}
  startupProbe:
    {{- include "token-broker-sidecar.probe" (list $config "/healthz") | nindent 4 }}
    periodSeconds: 1
    timeoutSeconds: 3
    failureThreshold: 30
  readinessProbe:
    {{- include "token-broker-sidecar.probe" (list $config "/readyz") | nindent 4 }}
    periodSeconds: 5
    timeoutSeconds: 3
  livenessProbe:
    {{- include "token-broker-sidecar.probe" (list $config "/healthz") | nindent 4 }}
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  resources:
    {{- toYaml $config.resources | nindent 4 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ $config.runAsUser | int64 }}
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: [ALL]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    # The pod's identity for the broker (audience-bound, rotated by the kubelet). Mounted here
    # only: the module containers never get it (moduleVolumeMounts does not include it).
    - name: token-broker-sa-token
      mountPath: /var/run/secrets/tokens
      readOnly: true
    {{- if and $config.tls.enabled $config.tls.caConfigMap }}
    # A directory, not subPath: a renewed CA reaches the sidecar, which re-reads the file.
    - name: token-broker-ca
      mountPath: /var/run/token-broker/ca
      readOnly: true
    {{- end }}
    {{- with $config.tokenDir }}
    - name: token-broker-tokens
      mountPath: {{ . }}
    {{- end }}
    {{- with $config.socket }}
    - name: token-broker-socket
      mountPath: {{ dir . }}
    {{- end }}
{{- end }}

{{- define "token-broker-sidecar.initContainers" -}}
{{- $config := include "token-broker-sidecar.config" . | fromJson -}}
{{- if $config.native }}
{{- include "token-broker-sidecar.container" . }}
{{- end }}
{{- end }}

{{- define "token-broker-sidecar.containers" -}}
{{- $config := include "token-broker-sidecar.config" . | fromJson -}}
{{- if not $config.native }}
{{- include "token-broker-sidecar.container" . }}
{{- end }}
{{- end }}

{{- define "token-broker-sidecar.volumes" -}}
{{- $config := include "token-broker-sidecar.config" . | fromJson -}}
- name: token-broker-sa-token
  projected:
    sources:
      - serviceAccountToken:
          audience: {{ $config.serviceAccountToken.audience | quote }}
          expirationSeconds: {{ $config.serviceAccountToken.expirationSeconds | int64 }}
          path: token-broker
{{- if and $config.tls.enabled $config.tls.caConfigMap }}
# The broker release writes this ConfigMap into the namespaces it lists (tls.caBundleNamespaces).
- name: token-broker-ca
  configMap:
    name: {{ $config.tls.caConfigMap }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if $config.tokenDir }}
- name: token-broker-tokens
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- if $config.socket }}
- name: token-broker-socket
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- end }}

{{/* Environment for the module's container: where to read tokens. */}}
{{- define "token-broker-sidecar.moduleEnv" -}}
{{- $config := include "token-broker-sidecar.config" . | fromJson -}}
{{- if $config.socket }}
- name: TOKEN_BROKER_SOCKET
  value: {{ $config.socket | quote }}
{{- else }}
- name: TOKEN_BROKER_URL
  value: {{ printf "http://127.0.0.1:%d" (int $config.port) | quote }}
{{- end }}
{{- with $config.tokenDir }}
- name: TOKEN_BROKER_TOKEN_DIR
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "token-broker-sidecar.moduleVolumeMounts" -}}
{{- $config := include "token-broker-sidecar.config" . | fromJson -}}
{{- with $config.tokenDir }}
- name: token-broker-tokens
  mountPath: {{ . }}
  readOnly: true
{{- end }}
{{- with $config.socket }}
# The socket's directory: connecting needs write access to the socket file.
- name: token-broker-socket
  mountPath: {{ dir . }}
{{- end }}
{{- end }}
