"""deltawatch sidecar: gRPC ingest, geometry engine, store, alerts, Prometheus export, HTTP API."""
