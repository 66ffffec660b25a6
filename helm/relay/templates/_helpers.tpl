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

{{- define "relay.port" -}}
{{- if eq .Values.mode "sidecar" -}}{{ .Values.sidecar.port }}{{- else -}}{{ .Values.service.port }}{{- end -}}
{{- end -}}

{{- define "relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "relay.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "relay.fullname" .)) -}}
{{- end -}}

{{- define "relay.hasSecret" -}}
{{- if or .Values.secrets.existingSecret .Values.secrets.create -}}true{{- end -}}
{{- end -}}

{{/* The relay config: .Values.config with mode-appropriate server.listen and spool.path. */}}
{{- define "relay.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $server := deepCopy (default dict $cfg.server) -}}
{{- if not $server.listen -}}
{{- if eq .Values.mode "sidecar" -}}
{{- $_ := set $server "listen" (printf "127.0.0.1:%v" .Values.sidecar.port) -}}
{{- else -}}
{{- $_ := set $server "listen" (printf "0.0.0.0:%v" .Values.service.port) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "server" $server -}}
{{- $spool := deepCopy (default dict $cfg.spool) -}}
{{- if not $spool.path -}}{{- $_ := set $spool "path" "/var/lib/relay/spool.db" -}}{{- end -}}
{{- $_ := set $cfg "spool" $spool -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
The relay container. In sidecar mode it listens on 127.0.0.1 only, so its probes run
`relay healthcheck` inside the container instead of the kubelet's HTTP probes.
*/}}
{{- define "relay.container" -}}
- name: relay
  image: {{ include "relay.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["serve", "-c", "/etc/relay/config/config.yaml"]
  {{- if ne .Values.mode "sidecar" }}
  ports:
    - name: http
      containerPort: {{ include "relay.port" . }}
      protocol: TCP
  livenessProbe:
    {{- toYaml .Values.livenessProbe | nindent 4 }}
  readinessProbe:
    {{- toYaml .Values.readinessProbe | nindent 4 }}
  {{- else }}
  livenessProbe:
    exec: {command: ["relay", "healthcheck", "-c", "/etc/relay/config/config.yaml"]}
    periodSeconds: 10
    failureThreshold: 3
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: relay-config
      mountPath: /etc/relay/config
      readOnly: true
    - name: relay-spool
      mountPath: /var/lib/relay
    {{- if include "relay.hasSecret" . }}
    - name: relay-secrets
      mountPath: /etc/relay/secrets
      readOnly: true
    {{- end }}
{{- end -}}

{{/* The volumes the relay container mounts. */}}
{{- define "relay.volumes" -}}
- name: relay-config
  configMap:
    name: {{ include "relay.fullname" . }}
- name: relay-spool
  {{- if and .Values.spool.persistence.enabled (ne .Values.mode "sidecar") }}
  persistentVolumeClaim:
    claimName: {{ .Values.spool.persistence.existingClaim | default (printf "%s-spool" (include "relay.fullname" .)) }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.spool.emptyDir.sizeLimit }}
  {{- end }}
{{- if include "relay.hasSecret" . }}
- name: relay-secrets
  secret:
    secretName: {{ include "relay.secretName" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/*
For a sender's own chart: add the relay to its pod.
  containers:
    {{- include "relay.sidecar" $relayContext | nindent 8 }}
  volumes:
    {{- include "relay.sidecarVolumes" $relayContext | nindent 8 }}
where $relayContext has .Values (this chart's values, mode: sidecar), .Release and .Chart.
*/}}
{{- define "relay.sidecar" -}}
{{ include "relay.container" . }}
{{- end -}}

{{- define "relay.sidecarVolumes" -}}
{{ include "relay.volumes" . }}
{{- end -}}

{{/* config.server.drain_timeout in whole seconds (default 20s), for the grace period. */}}
{{- define "relay.drainSeconds" -}}
{{- $d := (default dict .Values.config.server).drain_timeout | default "20s" | toString -}}
{{- if hasSuffix "ms" $d -}}1
{{- else if hasSuffix "s" $d -}}{{ trimSuffix "s" $d | float64 | ceil | int }}
{{- else if hasSuffix "m" $d -}}{{ mul (trimSuffix "m" $d | int) 60 }}
{{- else if hasSuffix "h" $d -}}{{ mul (trimSuffix "h" $d | int) 3600 }}
{{- else -}}20{{- end -}}
{{- end -}}
