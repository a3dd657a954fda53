{{/* Names, labels, images and the gateway's config: everything templates share. */}}

{{- define "llmops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* release-chart, truncated; the release name alone when it already holds the chart name. */}}
{{- define "llmops.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llmops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: fixed at install (selectors are immutable); never user labels. */}}
{{- define "llmops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmops.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "llmops.labels" -}}
helm.sh/chart: {{ include "llmops.chart" .ctx }}
{{ include "llmops.selectorLabels" . }}
app.kubernetes.io/part-of: llmops
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{- define "llmops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmops.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A model name as a DNS label: lower case, [a-z0-9-] only. */}}
{{- define "llmops.slug" -}}
{{- regexReplaceAll "[^a-z0-9-]+" (lower .) "-" | trimAll "-" -}}
{{- end -}}

{{/* The StatefulSet and Service of one pool: at most 52 characters (the controller-revision-hash
     label adds 11 to a StatefulSet's name and must stay within 63). */}}
{{- define "llmops.poolName" -}}
{{- printf "%s-%s-%s" (include "llmops.fullname" .ctx) (include "llmops.slug" .model.name | trunc 24 | trimSuffix "-") .pool.device | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* Base URLs of a pool's replicas: the StatefulSet's stable pod DNS names. An autoscaled pool
     lists every replica up to its maximum: those not running are probed and skipped like a
     failed replica, and each one the autoscaler adds takes traffic once healthy. */}}
{{- define "llmops.poolURLs" -}}
{{- $name := include "llmops.poolName" . -}}
{{- $scale := include "llmops.poolAutoscaling" . | fromJson -}}
{{- $urls := list -}}
{{- range $i, $_ := until (int (ternary $scale.maxReplicas .pool.replicas $scale.enabled)) -}}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc.%s:%d" $name $i $name $.ctx.Release.Namespace $.ctx.Values.clusterDomain (int $.ctx.Values.vllm.port)) -}}
{{- end -}}
{{- toJson $urls -}}
{{- end -}}

{{/* What the model's engines load: a hub id, or a folder on the model cache volume. */}}
{{- define "llmops.modelSource" -}}
{{- if .model.hfId -}}
{{- .model.hfId -}}
{{- else if hasPrefix "/" .model.path -}}
{{- .model.path -}}
{{- else -}}
{{- printf "%s/%s" (trimSuffix "/" .ctx.Values.modelCache.mountPath) .model.path -}}
{{- end -}}
{{- end -}}

{{- define "llmops.image" -}}
{{- printf "%s:%s" .repository (toString (default .ctx.Chart.AppVersion .tag)) -}}
{{- end -}}

{{- define "llmops.gatewayURL" -}}
{{- printf "http://%s-gateway.%s.svc.%s:%d" (include "llmops.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.gateway.service.port) -}}
{{- end -}}

{{- define "llmops.adminKeySecret" -}}
{{- default (printf "%s-admin-key" (include "llmops.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Where the workers and the gateway find the admin key. */}}
{{- define "llmops.adminKeyDir" -}}/var/run/secrets/llmops{{- end -}}

{{/* The embedded Qdrant engine is owned by one gateway process: refuse several. */}}
{{- define "llmops.checkValues" -}}
{{- if and (not .Values.qdrant.enabled) (not .Values.externalQdrant.url) -}}
{{- if or .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.replicas) 1) -}}
{{- fail "retrieval: without qdrant.enabled or externalQdrant.url the gateway uses its embedded index, which one process owns: set gateway.replicas=1 and gateway.autoscaling.enabled=false, or use a Qdrant server" -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.url) (not .Values.externalDatabase.existingSecret) -}}
{{- fail "database: set postgresql.enabled=true, externalDatabase.url or externalDatabase.existingSecret" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.url) (not .Values.externalRedis.existingSecret) -}}
{{- fail "redis: set redis.enabled=true, externalRedis.url or externalRedis.existingSecret" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $m := .Values.models -}}
{{- if and $m.hfId $m.path -}}
{{- fail (printf "models[%s]: set hfId or path, not both" $m.name) -}}
{{- end -}}
{{- if hasKey $seen $m.name -}}
{{- fail (printf "models: duplicate model name %q" $m.name) -}}
{{- end -}}
{{- $_ := set $seen $m.name true -}}
{{- $devices := dict -}}
{{- range $p := $m.pools -}}
{{- if hasKey $devices $p.device -}}
{{- fail (printf "models[%s]: two %s pools; a model has at most one pool per device" $m.name $p.device) -}}
{{- end -}}
{{- $_ := set $devices $p.device true -}}
{{- $pn := include "llmops.poolName" (dict "ctx" $ "model" $m "pool" $p) -}}
{{- if hasKey $seen (printf "pool:%s" $pn) -}}
{{- fail (printf "models[%s]: its %s pool's name %q clashes with another model's; shorten the names" $m.name $p.device $pn) -}}
{{- end -}}
{{- $_ := set $seen (printf "pool:%s" $pn) true -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The gateway's settings file (llmops/settings.py), from the same values as the engines.
     Secrets (database and Redis URLs with passwords, API keys) come from the environment. */}}
{{- define "llmops.gatewayConfig" -}}
{{- $models := list -}}
{{- range $m := .Values.models -}}
{{- $pools := list -}}
{{- range $p := $m.pools -}}
{{- $pool := dict "device" $p.device "priority" (int (default 0 $p.priority)) "urls" (include "llmops.poolURLs" (dict "ctx" $ "model" $m "pool" $p) | fromJsonArray) -}}
{{- /* as templates/vllm.yaml starts the engines */ -}}
{{- $_ := set $pool "priority_scheduling" (and $.Values.vllm.priorityScheduling (eq $m.kind "chat")) -}}
{{- $pool = merge $pool (default dict $p.routing) -}}
{{- $pools = append $pools $pool -}}
{{- end -}}
{{- $model := dict "name" $m.name "kind" $m.kind "context_length" (int $m.context_length) "pools" $pools "weights" (include "llmops.modelSource" (dict "ctx" $ "model" $m)) -}}
{{- if $m.served_name -}}
{{- $_ := set $model "served_name" $m.served_name -}}
{{- end -}}
{{- $models = append $models $model -}}
{{- end -}}
{{- $data := .Values.data.mountPath | trimSuffix "/" -}}
{{- $retrieval := dict "dimensions" (int .Values.retrieval.dimensions) "gateway_url" (include "llmops.gatewayURL" .) "path" (printf "%s/qdrant" $data) -}}
{{- if .Values.retrieval.embeddingModel -}}
{{- $_ := set $retrieval "embedding_model" .Values.retrieval.embeddingModel -}}
{{- end -}}
{{- if .Values.qdrant.enabled -}}
{{- $_ := set $retrieval "qdrant_url" (printf "http://%s-qdrant:6333" (include "llmops.fullname" .)) -}}
{{- else if .Values.externalQdrant.url -}}
{{- $_ := set $retrieval "qdrant_url" .Values.externalQdrant.url -}}
{{- end -}}
{{- $metrics := dict "worker_port" (int .Values.workers.metricsPort) -}}
{{- if .Values.gateway.metricsPort -}}
{{- $_ := set $metrics "port" (int .Values.gateway.metricsPort) -}}
{{- end -}}
{{- $console := dict "enabled" .Values.console.enabled "session_ttl_s" (int .Values.console.sessionTTLSeconds) -}}
{{- if not (kindIs "invalid" .Values.console.secureCookie) -}}
{{- $_ := set $console "secure_cookie" .Values.console.secureCookie -}}
{{- else if and .Values.ingress.enabled .Values.ingress.tls -}}
{{- /* TLS ends at the Ingress: the gateway itself sees plain HTTP */ -}}
{{- $_ := set $console "secure_cookie" true -}}
{{- end -}}
{{- $own := dict
  "host" "0.0.0.0"
  "port" (int .Values.gateway.port)
  "log_level" .Values.gateway.logLevel
  "admin_key_file" (printf "%s/%s" (include "llmops.adminKeyDir" .) .Values.auth.secretKey)
  "models" $models
  "files" (dict "root" (printf "%s/files" $data))
  "finetune" (dict "adapters_root" (printf "%s/adapters" $data))
  "ledger" (dict "spool_path" "/var/spool/llmops/usage.spool")
  "retrieval" $retrieval
  "metrics" $metrics
  "console" $console
-}}
{{- $config := mergeOverwrite (deepCopy (default dict .Values.gateway.config)) $own -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Environment shared by the gateway and the workers: the settings file, and the secrets. */}}
{{- define "llmops.appEnv" -}}
- name: LLMOPS_CONFIG
  value: /etc/llmops/config.yaml
- name: HOME
  value: /tmp
{{- if .Values.postgresql.enabled }}
- name: DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ default (printf "%s-postgresql" (include "llmops.fullname" .)) .Values.postgresql.existingSecret }}
      key: {{ .Values.postgresql.passwordKey }}
- name: LLMOPS_DATABASE_URL
  value: {{ printf "postgresql://%s:$(DB_PASSWORD)@%s-postgresql:5432/%s" .Values.postgresql.username (include "llmops.fullname" .) .Values.postgresql.database | quote }}
{{- else }}
- name: LLMOPS_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (printf "%s-external" (include "llmops.fullname" .)) .Values.externalDatabase.existingSecret }}
      key: {{ ternary .Values.externalDatabase.existingSecretKey "database-url" (not (empty .Values.externalDatabase.existingSecret)) }}
{{- end }}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ default (printf "%s-redis" (include "llmops.fullname" .)) .Values.redis.existingSecret }}
      key: {{ .Values.redis.passwordKey }}
- name: LLMOPS_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis:6379/0" (include "llmops.fullname" .) | quote }}
{{- else }}
- name: LLMOPS_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (printf "%s-external" (include "llmops.fullname" .)) .Values.externalRedis.existingSecret }}
      key: {{ ternary .Values.externalRedis.existingSecretKey "redis-url" (not (empty .Values.externalRedis.existingSecret)) }}
{{- end }}
{{- if .Values.qdrant.enabled }}
- name: LLMOPS_RETRIEVAL__QDRANT_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default (printf "%s-qdrant" (include "llmops.fullname" .)) .Values.qdrant.existingSecret }}
      key: {{ .Values.qdrant.apiKeyKey }}
{{- else if and .Values.externalQdrant.url .Values.externalQdrant.apiKeySecret }}
- name: LLMOPS_RETRIEVAL__QDRANT_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalQdrant.apiKeySecret }}
      key: {{ .Values.externalQdrant.apiKeySecretKey }}
{{- end }}
{{- if .Values.monitoring.metricsTokenSecret }}
- name: LLMOPS_METRICS__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.monitoring.metricsTokenSecret }}
      key: {{ .Values.monitoring.metricsTokenKey }}
{{- end }}
{{- end -}}

{{/* Volumes the gateway and workers share: config, admin key, data, scratch. */}}
{{- define "llmops.appVolumes" -}}
- name: config
  configMap:
    name: {{ include "llmops.fullname" . }}-config
- name: admin-key
  secret:
    secretName: {{ include "llmops.adminKeySecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.secretKey }}
        path: {{ .Values.auth.secretKey }}
- name: data
{{- if .Values.data.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-data" (include "llmops.fullname" .)) .Values.data.persistence.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "llmops.appVolumeMounts" -}}
- name: config
  mountPath: /etc/llmops
  readOnly: true
- name: admin-key
  mountPath: {{ include "llmops.adminKeyDir" . }}
  readOnly: true
- name: data
  mountPath: {{ .Values.data.mountPath }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "llmops.modelCacheVolume" -}}
- name: model-cache
{{- if .Values.modelCache.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-model-cache" (include "llmops.fullname" .)) .Values.modelCache.persistence.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* Hugging Face cache and token, for engines and fine-tuning workers. */}}
{{- define "llmops.hfEnv" -}}
- name: HF_HOME
  value: {{ printf "%s/hf" (trimSuffix "/" .Values.modelCache.mountPath) }}
{{- if .Values.modelCache.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- if .Values.modelCache.hfTokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.modelCache.hfTokenSecret }}
      key: {{ .Values.modelCache.hfTokenKey }}
{{- end }}
{{- end -}}

{{/* How Prometheus authenticates its scrapes (settings `metrics.token`). */}}
{{- define "llmops.scrapeAuth" -}}
{{- if .Values.monitoring.metricsTokenSecret }}
authorization:
  type: Bearer
  credentials:
    name: {{ .Values.monitoring.metricsTokenSecret }}
    key: {{ .Values.monitoring.metricsTokenKey }}
{{- end }}
{{- end -}}

{{/* A pool's autoscaling: vllm.autoscaling, with the pool's own `autoscaling` keys over it (dig,
     not merge: a pool's `enabled: false` must win over a global true). JSON. */}}
{{- define "llmops.poolAutoscaling" -}}
{{- $g := .ctx.Values.vllm.autoscaling -}}
{{- $min := int (dig "autoscaling" "minReplicas" (max 1 (int .pool.replicas)) .pool) -}}
{{- $max := int (dig "autoscaling" "maxReplicas" (max $min (int $g.maxReplicas)) .pool) -}}
{{- if lt $max $min -}}
{{- fail (printf "models[%s]: the %s pool's autoscaling.maxReplicas (%d) is below its minReplicas (%d)" .model.name .pool.device $max $min) -}}
{{- end -}}
{{- dict "enabled" (dig "autoscaling" "enabled" $g.enabled .pool) "minReplicas" $min "maxReplicas" $max | toJson -}}
{{- end -}}

{{/* The replicas of a workload an autoscaler owns: the live count on upgrades (so that `helm
     upgrade` neither resets what the autoscaler chose nor, by dropping the field, lets the API
     server default it to 1), the autoscaler's minimum on install. */}}
{{- define "llmops.autoscaledReplicas" -}}
{{- $live := lookup "apps/v1" .kind .ctx.Release.Namespace .name -}}
{{- if and $live $live.spec $live.spec.replicas -}}
{{- $live.spec.replicas -}}
{{- else -}}
{{- .min -}}
{{- end -}}
{{- end -}}

{{/* The first of `versions` whose `kind` the cluster serves (.Capabilities.APIVersions): PDBs
     reached policy/v1 in Kubernetes 1.21, HPAs autoscaling/v2 and CronJobs batch/v1 in 1.23;
     older clusters serve only the beta. Without a cluster (`helm template`), Helm assumes all. */}}
{{- define "llmops.apiVersion" -}}
{{- $found := "" -}}
{{- range .versions -}}
{{- if and (not $found) ($.ctx.Capabilities.APIVersions.Has (printf "%s/%s" . $.kind)) -}}
{{- $found = . -}}
{{- end -}}
{{- end -}}
{{- default (first .versions) $found -}}
{{- end -}}

{{/* A generated secret value, kept across upgrades (lookup finds the live one); base64. */}}
{{- define "llmops.keptSecret" -}}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- index $live.data .key -}}
{{- else -}}
{{- printf "%s%s" (default "" .prefix) (randAlphaNum (int .length)) | b64enc -}}
{{- end -}}
{{- end -}}
