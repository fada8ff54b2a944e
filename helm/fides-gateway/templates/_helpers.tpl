{{/* Names, labels and small shared pieces. */}}

{{- define "fides-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fides-gateway.fullname" -}}
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

{{- define "fides-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fides-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fides-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fides-gateway.labels" -}}
helm.sh/chart: {{ include "fides-gateway.chart" . }}
{{ include "fides-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fides
{{- end -}}

{{/* Labels for objects kube-prometheus-stack selects: ours, its release label, extra ones. */}}
{{- define "fides-gateway.monitoringLabels" -}}
{{ include "fides-gateway.labels" .root }}
{{- with .root.Values.metrics.prometheusRelease }}
release: {{ . | quote }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "fides-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fides-gateway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fides-gateway.image" -}}
{{- $variant := ternary "gpu" "cpu" .Values.gpu.enabled -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $variant) .Values.image.tag -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "fides-gateway.apiKeySecretName" -}}
{{- default (printf "%s-api-keys" (include "fides-gateway.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/* Where the gateway and the enclave's init container see the model repository. */}}
{{- define "fides-gateway.modelRepositoryPath" -}}
{{- if eq .Values.modelRepository.source "image" -}}
{{- .Values.modelRepository.imagePath -}}
{{- else -}}
{{- .Values.modelRepository.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "fides-gateway.modelRepositoryMount" -}}
{{- if ne .Values.modelRepository.source "image" }}
- name: model-repository
  mountPath: {{ .Values.modelRepository.mountPath }}
  readOnly: true
  {{- if and (eq .Values.modelRepository.source "pvc") .Values.modelRepository.pvc.subPath }}
  subPath: {{ .Values.modelRepository.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* The sealed file an enclave boots: sealed at start into the emptyDir, or given. */}}
{{- define "fides-gateway.sealedModelPath" -}}
{{- if .sealModel -}}
/var/lib/fides/enclave-sealed/{{ .name }}.sealed
{{- else -}}
{{- .sealedModel -}}
{{- end -}}
{{- end -}}

{{/* A model name as a container name (DNS label): lower case, "_" and "." as "-". */}}
{{- define "fides-gateway.containerSuffix" -}}
{{- .name | lower | replace "_" "-" | replace "." "-" -}}
{{- end -}}

{{/* The workload: a StatefulSet when the alarm state is on a claim (a replaced pod keeps its
name, so it reads its own <model>@<pod>.alarm.npz back), a Deployment otherwise. */}}
{{- define "fides-gateway.workloadKind" -}}
{{- if or .Values.alarmState.persistence.enabled .Values.alarmState.existingClaim -}}
StatefulSet
{{- else -}}
Deployment
{{- end -}}
{{- end -}}

{{/* Alarm-state settings that cannot work: refused at render time. */}}
{{- define "fides-gateway.checkAlarmState" -}}
{{- $state := .Values.alarmState -}}
{{- if and $state.persistence.enabled $state.existingClaim -}}
{{- fail "alarmState: set persistence.enabled (one claim per pod) or existingClaim (one claim for all pods), not both" -}}
{{- end -}}
{{- $pods := int .Values.replicaCount -}}
{{- if .Values.autoscaling.enabled -}}
{{- $pods = int .Values.autoscaling.maxReplicas -}}
{{- end -}}
{{- if and $state.existingClaim (gt $pods 1) (not $state.existingClaimReadWriteMany) -}}
{{- fail (printf "alarmState.existingClaim is mounted by every pod (up to %d here): it must be ReadWriteMany; set alarmState.existingClaimReadWriteMany=true once it is, or use alarmState.persistence.enabled (one claim per pod), or replicaCount=1" $pods) -}}
{{- end -}}
{{- end -}}
