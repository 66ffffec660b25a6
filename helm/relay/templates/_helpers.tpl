{{/* Names and labels. */}}
{{- define "relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "relay.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "relay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "relay.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "relay.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "relay.fullname" .)) -}}
{{- end -}}

{{- define "relay.hasSecret" -}}
{{- if or .Values.secrets.existingSecret .Values.secrets.create -}}true{{- end -}}
{{- end -}}

{{/* "sqlite" or "postgres": config.spool.backend. */}}
{{- define "relay.backend" -}}
{{- (default dict .Values.config.spool).backend | default "sqlite" -}}
{{- end -}}

{{/* Standalone only: the API token comes from a Secret (server.token_file), unless the config
already protects the listener itself (token, token_file, allow_cidrs, allow_unauthenticated). */}}
{{- define "relay.authToken" -}}
{{- $server := default dict .Values.config.server -}}
{{- if and (eq .Values.mode "standalone") .Values.auth.enabled (not (or $server.token $server.token_file $server.allow_cidrs $server.allow_unauthenticated)) -}}true{{- end -}}
{{- end -}}

{{- define "relay.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "relay.fullname" .)) -}}
{{- end -}}

{{/* PostgreSQL DSN from a Secret (spool.postgres.dsn_file), unless the config gives it. */}}
{{- define "relay.dsnSecret" -}}
{{- $pg := (default dict (default dict .Values.config.spool).postgres) -}}
{{- if and (eq (include "relay.backend" .) "postgres") .Values.spool.postgres.existingSecret (not (or $pg.dsn $pg.dsn_file)) -}}true{{- end -}}
{{- end -}}

{{/* Sidecar mode, exposed: listen on the pod's address for the kubelet and Prometheus;
/v1/* stays loopback-only through server.allow_cidrs (probes and /metrics are exempt). */}}
{{- define "relay.sidecarExposed" -}}
{{- if and (eq .Values.mode "sidecar") .Values.sidecar.expose -}}true{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity ("1Gi", "500M", "2048") in bytes. */}}
{{- define "relay.bytes" -}}
{{- $q := toString . -}}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- $unit := regexReplaceAll "^[0-9.]+" $q "" -}}
{{- if not (hasKey $units $unit) -}}{{- fail (printf "cannot read the size %q: expected a number with Ki, Mi, Gi, Ti, k, M, G or T" $q) -}}{{- end -}}
{{- mulf (regexFind "^[0-9.]+" $q | float64) (get $units $unit) | floor | int64 -}}
{{- end -}}

{{/* The size of the spool's volume, "" when unbounded. */}}
{{- define "relay.spoolVolumeSize" -}}
{{- if .Values.spool.persistence.enabled -}}{{ .Values.spool.persistence.size }}{{- else -}}{{ .Values.spool.emptyDir.sizeLimit }}{{- end -}}
{{- end -}}

{{/* The relay config: .Values.config with mode-appropriate defaults filled in. */}}
{{- define "relay.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $server := deepCopy (default dict $cfg.server) -}}
{{- if not $server.listen -}}
{{- if eq .Values.mode "standalone" -}}
{{- $_ := set $server "listen" (printf "0.0.0.0:%v" .Values.service.port) -}}
{{- else if include "relay.sidecarExposed" . -}}
{{- $_ := set $server "listen" (printf "0.0.0.0:%v" .Values.sidecar.port) -}}
{{- else -}}
{{- $_ := set $server "listen" (printf "127.0.0.1:%v" .Values.sidecar.port) -}}
{{- end -}}
{{- end -}}
{{- if and (include "relay.sidecarExposed" .) (not $server.allow_cidrs) -}}
{{- $_ := set $server "allow_cidrs" (list "127.0.0.1/32" "::1/128") -}}
{{- end -}}
{{- if include "relay.authToken" . -}}
{{- $_ := set $server "token_file" "/etc/relay/auth/token" -}}
{{- end -}}
{{- $_ := set $cfg "server" $server -}}
{{- $spool := deepCopy (default dict $cfg.spool) -}}
{{- if eq (include "relay.backend" .) "postgres" -}}
{{- if include "relay.dsnSecret" . -}}
{{- $pg := deepCopy (default dict $spool.postgres) -}}
{{- $_ := set $pg "dsn_file" "/etc/relay/postgres/dsn" -}}
{{- $_ := set $spool "postgres" $pg -}}
{{- end -}}
{{- else -}}
{{- if not $spool.path -}}{{- $_ := set $spool "path" "/var/lib/relay/spool.db" -}}{{- end -}}
{{- $size := include "relay.spoolVolumeSize" . -}}
{{- if and $size (not (hasKey $spool "max_bytes")) -}}
{{- $_ := set $spool "max_bytes" (div (mul (include "relay.bytes" $size | int64) (.Values.spool.maxBytesPercent | int64)) 100) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "spool" $spool -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The port the relay listens on: the one in the rendered server.listen. */}}
{{- define "relay.port" -}}
{{- $cfg := include "relay.config" . | fromYaml -}}
{{- regexReplaceAll "^.*:" (toString $cfg.server.listen) "" -}}
{{- end -}}

{{/* A duration as the relay reads it ("90s", "1m30s", "1.5m", "2d", "100ms") in whole
seconds, rounded up. The one place the chart turns durations into numbers. */}}
{{- define "relay.seconds" -}}
{{- $d := toString . | trim -}}
{{- if not (regexMatch "^([0-9]+(\\.[0-9]+)?(ms|s|m|h|d))+$" $d) -}}
{{- fail (printf "config.server.drain_timeout: expected a duration such as '20s', '1m30s' or '2d' (got %q)" $d) -}}
{{- end -}}
{{- $units := dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ms|s|m|h|d)" $d -1 -}}
{{- $n := regexFind "^[0-9.]+" . | float64 -}}
{{- $total = addf $total (mulf $n (get $units (regexReplaceAll "^[0-9.]+" . ""))) -}}
{{- end -}}
{{- ceil $total | int -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: preStop sleep + server.drain_timeout + the margin. */}}
{{- define "relay.gracePeriod" -}}
{{- $drain := (default dict .Values.config.server).drain_timeout | default "20s" -}}
{{- add (include "relay.seconds" $drain | int) .Values.preStopSleepSeconds .Values.terminationGraceExtraSeconds -}}
{{- end -}}

{{/* Secret files: 0440 when the pod's fsGroup (ours, standalone) owns them, else 0444: a
sender's pod may not set fsGroup, and then only "other" can read. */}}
{{- define "relay.secretMode" -}}
{{- if and (eq .Values.mode "standalone") .Values.podSecurityContext.fsGroup -}}288{{- else -}}292{{- end -}}
{{- end -}}

{{/* Where the SQLite spool lives: "volume" (emptyDir or one PVC), "claimTemplate" (a
StatefulSet's PVC per replica) or "none" (PostgreSQL). */}}
{{- define "relay.spoolStorage" -}}
{{- $p := .Values.spool.persistence -}}
{{- if eq (include "relay.backend" .) "postgres" -}}none
{{- else if and $p.enabled (not $p.existingClaim) (or (eq .Values.mode "sidecar") (gt (int .Values.replicaCount) 1)) -}}claimTemplate
{{- else -}}volume{{- end -}}
{{- end -}}

{{- define "relay.probe" -}}
{{- $probe := deepCopy .probe -}}
{{- if $probe.httpGet -}}{{- $_ := set $probe "httpGet" (merge (dict "port" (int .port)) (omit $probe.httpGet "port")) -}}{{- end -}}
{{- toYaml $probe -}}
{{- end -}}

{{/*
The relay container. Probed over HTTP (standalone, and sidecar with sidecar.expose);
a loopback-only sidecar runs `relay healthcheck --url` inside the container instead.
*/}}
{{- define "relay.container" -}}
{{- $port := include "relay.port" . | int -}}
{{- $http := or (eq .Values.mode "standalone") (include "relay.sidecarExposed" .) -}}
- name: relay
  image: {{ include "relay.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["serve", "-c", "/etc/relay/config/config.yaml"]
  {{- if and (eq .Values.mode "sidecar") .Values.sidecar.native }}
  restartPolicy: Always  # a native sidecar (Kubernetes >= 1.29): up before, down after the app
  {{- end }}
  {{- with .Values.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $http }}
  ports:
    - name: {{ ternary "http" "relay-http" (eq .Values.mode "standalone") }}
      containerPort: {{ $port }}
      protocol: TCP
  startupProbe:
    {{- include "relay.probe" (dict "probe" .Values.startupProbe "port" $port) | nindent 4 }}
  livenessProbe:
    {{- include "relay.probe" (dict "probe" .Values.livenessProbe "port" $port) | nindent 4 }}
  readinessProbe:
    {{- include "relay.probe" (dict "probe" .Values.readinessProbe "port" $port) | nindent 4 }}
  {{- else }}
  livenessProbe:
    exec: {command: ["relay", "healthcheck", "--url", "http://127.0.0.1:{{ $port }}"]}
    periodSeconds: {{ .Values.livenessProbe.periodSeconds | default 10 }}
    failureThreshold: {{ .Values.livenessProbe.failureThreshold | default 3 }}
  {{- end }}
  lifecycle:
    preStop:
      # keep serving while the endpoint is taken out of Services, then SIGTERM drains
      exec: {command: ["sleep", "{{ .Values.preStopSleepSeconds }}"]}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: relay-config
      mountPath: /etc/relay/config
      readOnly: true
    {{- if ne (include "relay.spoolStorage" .) "none" }}
    - name: relay-spool
      mountPath: /var/lib/relay
    {{- end }}
    {{- if include "relay.hasSecret" . }}
    - name: relay-secrets
      mountPath: /etc/relay/secrets
      readOnly: true
    {{- end }}
    {{- if include "relay.authToken" . }}
    - name: relay-auth
      mountPath: /etc/relay/auth
      readOnly: true
    {{- end }}
    {{- if include "relay.dsnSecret" . }}
    - name: relay-postgres
      mountPath: /etc/relay/postgres
      readOnly: true
    {{- end }}
{{- end -}}

{{/* The volumes the relay container mounts (a StatefulSet's spool claims come from
"relay.volumeClaimTemplates" instead). */}}
{{- define "relay.volumes" -}}
{{- $mode := include "relay.secretMode" . | int -}}
- name: relay-config
  configMap:
    name: {{ include "relay.fullname" . }}
{{- if eq (include "relay.spoolStorage" .) "volume" }}
- name: relay-spool
  {{- if .Values.spool.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.spool.persistence.existingClaim | default (printf "%s-spool" (include "relay.fullname" .)) }}
  {{- else }}
  emptyDir:
    {{- with .Values.spool.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
  {{- end }}
{{- end }}
{{- if include "relay.hasSecret" . }}
- name: relay-secrets
  secret:
    secretName: {{ include "relay.secretName" . }}
    defaultMode: {{ $mode }}
{{- end }}
{{- if include "relay.authToken" . }}
- name: relay-auth
  secret:
    secretName: {{ include "relay.authSecretName" . }}
    defaultMode: {{ $mode }}
    items: [{key: {{ .Values.auth.secretKey | quote }}, path: token}]
{{- end }}
{{- if include "relay.dsnSecret" . }}
- name: relay-postgres
  secret:
    secretName: {{ .Values.spool.postgres.existingSecret }}
    defaultMode: {{ $mode }}
    items: [{key: {{ .Values.spool.postgres.secretKey | quote }}, path: dsn}]
{{- end }}
{{- end -}}

{{/* One spool PVC per replica, for a StatefulSet (ours, or the sender's in sidecar mode). */}}
{{- define "relay.volumeClaimTemplates" -}}
- metadata:
    name: relay-spool
  spec:
    accessModes:
      {{- toYaml .Values.spool.persistence.accessModes | nindent 6 }}
    {{- with .Values.spool.persistence.storageClass }}
    storageClassName: {{ . }}
    {{- end }}
    resources:
      requests:
        storage: {{ .Values.spool.persistence.size }}
{{- end -}}

{{/*
For a sender's own chart: add the relay to its pod.
  containers:            # or initContainers: with sidecar.native: true
    {{- include "relay.sidecar" $relayContext | nindent 8 }}
  volumes:
    {{- include "relay.sidecarVolumes" $relayContext | nindent 8 }}
  # a StatefulSet with spool.persistence.enabled (one spool PVC per pod):
  volumeClaimTemplates:
    {{- include "relay.volumeClaimTemplates" $relayContext | nindent 4 }}
where $relayContext has .Values (this chart's values, mode: sidecar), .Release and .Chart.
*/}}
{{- define "relay.sidecar" -}}
{{ include "relay.container" . }}
{{- end -}}

{{- define "relay.sidecarVolumes" -}}
{{ include "relay.volumes" . }}
{{- end -}}

{{/* The pod spec fields every relay workload shares (not containers or volumes). */}}
{{- define "relay.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ include "relay.gracePeriod" . }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
