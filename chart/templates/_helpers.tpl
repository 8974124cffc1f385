{{/*
Expand the name of the chart.
*/}}
{{- define "streaming-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated at 63 characters (DNS label limit). A release name that already
contains the chart name is used as is.
*/}}
{{- define "streaming-gateway.fullname" -}}
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

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "streaming-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels. Never used as selectors: helm.sh/chart and the version change on upgrade.
*/}}
{{- define "streaming-gateway.labels" -}}
helm.sh/chart: {{ include "streaming-gateway.chart" . }}
{{ include "streaming-gateway.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: streaming-gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of the `helm test` pod: outside every workload selector (its name is `<name>-test`), so no Service
routes to it and no PodDisruptionBudget, HPA or topology spread counts it.
*/}}
{{- define "streaming-gateway.testLabels" -}}
helm.sh/chart: {{ include "streaming-gateway.chart" . }}
{{ include "streaming-gateway.testSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: streaming-gateway
app.kubernetes.io/component: test
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "streaming-gateway.testSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-test" (include "streaming-gateway.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels: only name and instance, so they never change across upgrades.
*/}}
{{- define "streaming-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streaming-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount to use.
*/}}
{{- define "streaming-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "streaming-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
"true" when the gateway finds its model servers by watching EndpointSlices (UPSTREAM_DISCOVERY=kubernetes):
only then does it get a Role, a RoleBinding and its ServiceAccount's token.
*/}}
{{- define "streaming-gateway.watchesEndpointSlices" -}}
{{- eq (toString (index .Values.gateway.env "UPSTREAM_DISCOVERY")) "kubernetes" }}
{{- end }}

{{/*
The namespace of UPSTREAM_K8S_SERVICE (`namespace/name`), where the Role that lets the gateway watch it lives.
*/}}
{{- define "streaming-gateway.upstreamServiceNamespace" -}}
{{- $service := toString (index .Values.gateway.env "UPSTREAM_K8S_SERVICE" | default "") }}
{{- $parts := splitList "/" $service }}
{{- if or (ne (len $parts) 2) (not (first $parts)) (not (last $parts)) }}
{{- fail (printf "`gateway.env.UPSTREAM_K8S_SERVICE` must be `namespace/name` with UPSTREAM_DISCOVERY=kubernetes (got %q)" $service) }}
{{- end }}
{{- first $parts }}
{{- end }}

{{/*
Container image: the tag defaults to the chart's appVersion; a digest, when set, pins the image.
*/}}
{{- define "streaming-gateway.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
One setting as an environment variable value. Helm reads every YAML number as float64, and Go prints
1048576.0 as "1.048576e+06": whole numbers are printed as integers, the rest as they are.
*/}}
{{- define "streaming-gateway.envValue" -}}
{{- if kindIs "float64" . }}
{{- if eq (float64 (int64 .)) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
A setting's value from gateway.env (fails if the generated key is missing).
Usage: include "streaming-gateway.setting" (list $ "TOTAL_TIMEOUT_SECONDS")
*/}}
{{- define "streaming-gateway.setting" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- if not (hasKey $root.Values.gateway.env $name) }}
{{- fail (printf "`gateway.env.%s` is missing: it is a gateway setting the chart relies on" $name) }}
{{- end }}
{{- index $root.Values.gateway.env $name }}
{{- end }}

{{/*
Seconds in a Gateway API duration ("1h30m", "300s", "500ms"); 0 for "0s".
*/}}
{{- define "streaming-gateway.durationSeconds" -}}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9]+(ms|h|m|s)" . -1 }}
{{- $n := regexFind "^[0-9]+" . | float64 }}
{{- $unit := trimPrefix (regexFind "^[0-9]+" .) . }}
{{- if eq $unit "h" }}{{ $total = addf $total (mulf $n 3600) }}
{{- else if eq $unit "m" }}{{ $total = addf $total (mulf $n 60) }}
{{- else if eq $unit "s" }}{{ $total = addf $total $n }}
{{- else }}{{ $total = addf $total (divf $n 1000) }}
{{- end }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
Streams in flight per pod that autoscaling aims at: a fraction of MAX_CONNECTIONS, at least 1.
Usage: include "streaming-gateway.targetStreamsPerPod" (list $ fraction)
*/}}
{{- define "streaming-gateway.targetStreamsPerPod" -}}
{{- $root := index . 0 }}
{{- $limit := include "streaming-gateway.setting" (list $root "MAX_CONNECTIONS") | float64 }}
{{- max 1 (mulf $limit (index . 1) | floor | int64) }}
{{- end }}

{{/*
Is Redis configured (gateway.redis.url or .existingSecret)? "true" or "".
*/}}
{{- define "streaming-gateway.redisEnabled" -}}
{{- if or .Values.gateway.redis.url .Values.gateway.redis.existingSecret }}true{{ end }}
{{- end }}

{{/*
Does this release keep resume history on the pod's /tmp (RESUME_ENABLED and the local store)? "true" or "".
*/}}
{{- define "streaming-gateway.localResume" -}}
{{- $enabled := include "streaming-gateway.setting" (list . "RESUME_ENABLED") | toString }}
{{- $store := include "streaming-gateway.setting" (list . "RESUME_STORE") }}
{{- if and (eq $enabled "true") (eq $store "local") (not (include "streaming-gateway.redisEnabled" .)) }}true{{ end }}
{{- end }}

{{/*
The /tmp emptyDir size limit: `tmpVolume.sizeLimit`, or computed from the settings (MiB): room for metrics and
temp files, plus, with the local resume store, the history it keeps: peak tokens/s × how long a stream's events
stay (the stream's own life, up to TOTAL_TIMEOUT_SECONDS, then RESUME_TTL_SECONDS) × bytes per event.
*/}}
{{- define "streaming-gateway.tmpSizeLimit" -}}
{{- if .Values.tmpVolume.sizeLimit }}
{{- .Values.tmpVolume.sizeLimit }}
{{- else }}
{{- $mi := .Values.tmpVolume.baseMi | float64 }}
{{- if include "streaming-gateway.localResume" . }}
{{- $seconds := addf (include "streaming-gateway.setting" (list . "RESUME_TTL_SECONDS") | float64) (include "streaming-gateway.setting" (list . "TOTAL_TIMEOUT_SECONDS") | float64) }}
{{- $bytes := mulf (.Values.tmpVolume.resumeTokensPerSecond | float64) $seconds (.Values.tmpVolume.resumeBytesPerEvent | float64) }}
{{- $mi = addf $mi (divf $bytes 1048576) }}
{{- end }}
{{- printf "%dMi" ($mi | ceil | int64) }}
{{- end }}
{{- end }}

{{/*
MiB in a quantity ("512Mi", "2Gi", "1G", "1048576"), rounded up.
*/}}
{{- define "streaming-gateway.quantityMi" -}}
{{- $n := regexFind "^[0-9.]+" . | float64 }}
{{- $unit := trimPrefix (regexFind "^[0-9.]+" .) . }}
{{- $factor := dict "" 0.00000095367431640625 "Ki" 0.0009765625 "Mi" 1.0 "Gi" 1024.0 "Ti" 1048576.0 "k" 0.00095367431640625 "M" 0.95367431640625 "G" 953.67431640625 "T" 976562.5 }}
{{- mulf $n (get $factor $unit) | ceil | int64 }}
{{- end }}

{{/*
Matchers that select this release's series (every rule and alert is scoped to them).
*/}}
{{- define "streaming-gateway.releaseSelector" -}}
{{- .Values.prometheusRule.releaseSelector | default (printf "namespace=%q, job=%q" .Release.Namespace (include "streaming-gateway.fullname" .)) }}
{{- end }}

{{/*
Timing checks: refuse values under which Kubernetes or the proxy would cut streams the gateway still serves.
*/}}
{{- define "streaming-gateway.validate" -}}
{{- $drain := include "streaming-gateway.setting" (list . "DRAIN_TIMEOUT_SECONDS") | float64 }}
{{- $close := include "streaming-gateway.setting" (list . "DRAIN_CLOSE_GRACE_SECONDS") | float64 }}
{{- $total := include "streaming-gateway.setting" (list . "TOTAL_TIMEOUT_SECONDS") | float64 }}
{{- $preStop := .Values.preStop.sleepSeconds | float64 }}
{{- $margin := .Values.shutdownMarginSeconds | float64 }}
{{- $linger := .Values.drainMetricsLingerSeconds | float64 }}
{{- $grace := .Values.terminationGracePeriodSeconds | float64 }}
{{- $needed := addf $preStop $drain $linger (mulf 2 $close) $margin }}
{{- if le $grace $needed }}
{{- fail (printf "`terminationGracePeriodSeconds` (%v) must exceed `preStop.sleepSeconds` (%v) + `gateway.env.DRAIN_TIMEOUT_SECONDS` (%v) + `drainMetricsLingerSeconds` (%v) + 2 × `gateway.env.DRAIN_CLOSE_GRACE_SECONDS` (%v) + `shutdownMarginSeconds` (%v) = %v, or Kubernetes kills streams the drain still waits for: raise `terminationGracePeriodSeconds` or lower the others" $grace $preStop $drain $linger $close $margin $needed) }}
{{- end }}
{{- if .Values.ingress.enabled }}
{{- $proxy := .Values.ingress.proxyTimeoutSeconds | float64 }}
{{- if le $proxy $total }}
{{- fail (printf "`ingress.proxyTimeoutSeconds` (%v) must exceed `gateway.env.TOTAL_TIMEOUT_SECONDS` (%v), or ingress-nginx cuts streams the gateway still serves: raise `ingress.proxyTimeoutSeconds` or lower `gateway.env.TOTAL_TIMEOUT_SECONDS`" $proxy $total) }}
{{- end }}
{{- end }}
{{- range $name, $route := .Values.route }}
{{- if $route.enabled }}
{{- range $field, $value := ($route.timeouts | default dict) }}
{{- $seconds := include "streaming-gateway.durationSeconds" $value | float64 }}
{{- if and (ne $seconds 0.0) (le $seconds $total) }}
{{- fail (printf "`route.%s.timeouts.%s` (%s) must exceed `gateway.env.TOTAL_TIMEOUT_SECONDS` (%v) (or be `0s`, no timeout), or the Gateway cuts streams the gateway still serves: raise `route.%s.timeouts.%s` or lower `gateway.env.TOTAL_TIMEOUT_SECONDS`" $name $field $value $total $name $field) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq (include "streaming-gateway.setting" (list . "RESUME_ENABLED") | toString | lower) "true" }}
{{- $delay := include "streaming-gateway.setting" (list . "RESUME_WRITE_DELAY_SECONDS") | float64 }}
{{- $ttl := include "streaming-gateway.setting" (list . "RESUME_TTL_SECONDS") | float64 }}
{{- if ge $delay (divf $ttl 2) }}
{{- fail (printf "`gateway.env.RESUME_WRITE_DELAY_SECONDS` (%v) must be less than half of `gateway.env.RESUME_TTL_SECONDS` (%v) while `gateway.env.RESUME_ENABLED` is true, or a connected stream's log expires while its events wait in memory (the gateway refuses to start): lower `gateway.env.RESUME_WRITE_DELAY_SECONDS` or raise `gateway.env.RESUME_TTL_SECONDS`" $delay $ttl) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "`autoscaling.enabled` and `keda.enabled` are both true: KEDA creates its own HorizontalPodAutoscaler, and two autoscalers fight over one Deployment; enable one of them" }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "`autoscaling.minReplicas` (%v) must not exceed `autoscaling.maxReplicas` (%v)" .Values.autoscaling.minReplicas .Values.autoscaling.maxReplicas) }}
{{- end }}
{{- end }}
{{- if and .Values.prometheusRule.enabled (not .Values.prometheusRule.runbookBaseUrl) }}
{{- fail "`prometheusRule.runbookBaseUrl` is empty: set it to where your copy of dashboards/RUNBOOK.md is served, so every alert's runbook_url leads somewhere" }}
{{- end }}
{{- if .Values.keda.enabled }}
{{- if lt (int .Values.keda.minReplicaCount) 1 }}
{{- fail "`keda.minReplicaCount` must be at least 1: the trigger's metric comes from the gateway's own pods, so from zero replicas it could never scale up" }}
{{- end }}
{{- if gt (int .Values.keda.minReplicaCount) (int .Values.keda.maxReplicaCount) }}
{{- fail (printf "`keda.minReplicaCount` (%v) must not exceed `keda.maxReplicaCount` (%v)" .Values.keda.minReplicaCount .Values.keda.maxReplicaCount) }}
{{- end }}
{{- end }}
{{- end }}
