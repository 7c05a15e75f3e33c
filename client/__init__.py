"""deltawatch client: the hook a trainer imports.

Depends on torch, numpy, grpcio and protobuf only; never imports the sidecar.
"""
