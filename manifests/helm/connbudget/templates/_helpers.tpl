{{- define "connbudget.labels" -}}
app.kubernetes.io/name: connbudget
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "connbudget.selector" -}}
app.kubernetes.io/name: connbudget
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Rules the operator needs in every namespace it watches (see manifests/rbac.yaml). */}}
{{- define "connbudget.namespacedRules" -}}
- apiGroups: [connbudget.io]
  resources: [connectionbudgets]
  verbs: [get, list, watch]
- apiGroups: [connbudget.io]
  resources: [connectionbudgets/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch{{ if .Values.rbac.deletePods }}, delete{{ end }}]
- apiGroups: [""]
  resources: [pods/eviction]
  verbs: [create]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [apps]
  resources: [deployments/scale, statefulsets/scale]
  verbs: [get, patch]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list]
- apiGroups: [apps]
  resources: [deployments, statefulsets]
  verbs: [get]
{{- if .Values.rbac.rolloutRestart }}
- apiGroups: [apps]
  resources: [deployments, statefulsets, daemonsets]
  verbs: [patch]
{{- end }}
{{- if .Values.rbac.cnpgPoolers }}
- apiGroups: [postgresql.cnpg.io]
  resources: [poolers/scale]
  verbs: [get, patch]
{{- end }}
{{- end -}}
