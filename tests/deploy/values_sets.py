"""Realistic values for the chart: what platform teams would pass to `helm install -f`."""

from __future__ import annotations

from typing import Any

DEFAULT: dict[str, Any] = {}

PROMETHEUS = {"release": "kube-prometheus-stack"}  # the label kube-prometheus-stack selects

# A GPU cluster serving two chat models (one with a CPU fallback pool) and an embedding model,
# with monitoring through the Prometheus Operator and Grafana's sidecar, and an Ingress.
GPU_CLUSTER: dict[str, Any] = {
    "models": [
        {"name": "llama-3.1-8b-instruct", "kind": "chat",
         "hfId": "meta-llama/Llama-3.1-8B-Instruct",
         "served_name": "meta-llama/Llama-3.1-8B-Instruct",
         "context_length": 16384, "lora": {"enabled": True, "maxRank": 64, "maxLoras": 8},
         "vllmArgs": ["--enable-prefix-caching", "--enable-auto-tool-choice",
                      "--tool-call-parser", "llama3_json"],
         "pools": [
             {"device": "gpu", "replicas": 3, "priority": 10,
              "gpu": {"count": 1, "product": "NVIDIA-L40S"},
              "resources": {"requests": {"cpu": "6", "memory": "40Gi"},
                            "limits": {"memory": "48Gi"}},
              "routing": {"cost_per_hour_usd": 1.8, "decode_tokens_per_s": 2500,
                          "prefill_tokens_per_s": 40000, "max_concurrency": 128}},
             {"device": "cpu", "replicas": 1, "priority": 0,
              "resources": {"requests": {"cpu": "16", "memory": "48Gi"}},
              "nodeSelector": {"node.kubernetes.io/instance-type": "c7i.8xlarge"}},
         ]},
        {"name": "qwen2.5-72b-instruct", "kind": "chat", "path": "weights/Qwen2.5-72B-Instruct-AWQ",
         "context_length": 32768, "lora": {"enabled": False},
         "pools": [{"device": "gpu", "replicas": 2, "priority": 10,
                    "gpu": {"count": 4, "product": "NVIDIA-H100-80GB-HBM3"},
                    "tolerations": [{"key": "dedicated", "value": "llm", "effect": "NoSchedule"}],
                    "vllmArgs": ["--quantization", "awq"]}]},
        {"name": "bge-small-en-v1.5", "kind": "embedding", "hfId": "BAAI/bge-small-en-v1.5",
         "context_length": 512,
         "pools": [{"device": "cpu", "replicas": 2, "priority": 0}]},
    ],
    "retrieval": {"embeddingModel": "bge-small-en-v1.5", "dimensions": 384},
    "modelCache": {"hfTokenSecret": "hf-token",
                   "persistence": {"storageClass": "efs-sc", "size": "2Ti"}},
    "data": {"persistence": {"storageClass": "efs-sc"}},
    "gateway": {"metricsPort": 9090,
                "autoscaling": {"minReplicas": 3, "maxReplicas": 20},
                "config": {"routing": {"cooldown_s": 5, "max_attempts": 2,
                                       "weight_prefix": 3.0, "load_floor": 8},
                           "limits": {"fail_open": True}, "drift": {"sample_rate": 0.1},
                           "retrieval": {"score_threshold": 0.5},
                           "max_body_bytes": 8388608}},
    "workers": {"finetune": {"replicas": 2,
                             "gpu": {"count": 1, "product": "NVIDIA-A100-SXM4-80GB"}},
                "ingest": {"replicas": 3, "concurrency": 8}},
    "monitoring": {"metricsTokenSecret": "llmops-metrics",
                   "serviceMonitor": {"enabled": True, "labels": PROMETHEUS},
                   "podMonitor": {"enabled": True, "labels": PROMETHEUS},
                   "prometheusRule": {"enabled": True, "labels": PROMETHEUS},
                   "dashboards": {"enabled": True}},
    "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]},
    "ingress": {"enabled": True, "className": "nginx",
                "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "600",
                                "nginx.ingress.kubernetes.io/proxy-buffering": "off"},
                "hosts": [{"host": "llm.example.com",
                           "paths": [{"path": "/", "pathType": "Prefix"}]}],
                "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]},
}

# No GPUs at all: vLLM's CPU image for every model, training on the CPU, the gateway's embedded
# index (so one gateway), small volumes.
CPU_ONLY: dict[str, Any] = {
    "models": [
        {"name": "smollm2-135m-instruct", "kind": "chat",
         "hfId": "HuggingFaceTB/SmolLM2-135M-Instruct",
         "context_length": 2048, "lora": {"enabled": True, "maxRank": 16, "maxLoras": 2},
         "pools": [{"device": "cpu", "replicas": 2, "priority": 0,
                    "resources": {"requests": {"cpu": "4", "memory": "8Gi"}}}]},
        {"name": "all-minilm-l6-v2", "kind": "embedding",
         "hfId": "sentence-transformers/all-MiniLM-L6-v2",
         "context_length": 256, "pools": [{"device": "cpu", "replicas": 1}]},
    ],
    "gateway": {"replicas": 1, "autoscaling": {"enabled": False}, "pdb": {"enabled": False}},
    "qdrant": {"enabled": False},
    "workers": {"finetune": {"gpu": {"count": 0},
                             "resources": {"requests": {"cpu": "4", "memory": "8Gi"}}}},
    "data": {"persistence": {"accessModes": ["ReadWriteOnce"], "size": "10Gi"}},
    "modelCache": {"persistence": {"accessModes": ["ReadWriteOnce"], "size": "20Gi"}},
}

# Managed PostgreSQL, Redis and Qdrant: by URL (database), by Secrets the platform team manages
# (Redis, Qdrant's key, the admin key).
EXTERNAL: dict[str, Any] = {
    "auth": {"existingSecret": "llmops-admin", "secretKey": "key"},
    "postgresql": {"enabled": False},
    "externalDatabase": {"url": "postgresql://llmops:s3cret@db.example.internal:5432/llmops"},
    "redis": {"enabled": False},
    "externalRedis": {"existingSecret": "llmops-redis", "existingSecretKey": "url"},
    "qdrant": {"enabled": False},
    "externalQdrant": {"url": "https://qdrant.example.internal:6333",
                       "apiKeySecret": "llmops-qdrant", "apiKeySecretKey": "api-key"},
}

VALUE_SETS = {"default": DEFAULT, "gpu-cluster": GPU_CLUSTER, "cpu-only": CPU_ONLY,
              "external": EXTERNAL}
