"""Observability: metrics, tracing, drift detection, Grafana dashboards and alert rules."""
