{{- define "edgewire.labels" -}}
app.kubernetes.io/name: edgewire
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "edgewire.operatorName" -}}{{ .Release.Name }}-operator{{- end }}
{{- define "edgewire.agentName" -}}{{ .Release.Name }}-agent{{- end }}
{{- define "edgewire.hubName" -}}{{ .Release.Name }}-hub{{- end }}

{{- define "edgewire.image" -}}
{{- $img := index .root.Values.image .component -}}
{{- $tag := $img.tag | default .root.Chart.AppVersion -}}
{{- if .root.Values.image.registry -}}
{{ .root.Values.image.registry }}/{{ $img.repository }}:{{ $tag }}
{{- else -}}
{{ $img.repository }}:{{ $tag }}
{{- end -}}
{{- end }}

{{- define "edgewire.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}
