#!/usr/bin/env bash
# Regenerate the Python modules of the wire protocol beside the .proto, with the exactly pinned
# grpcio-tools of the dev extra (tests/test_wire_codegen.py fails when the committed files differ).
#   protos/generate.sh [OUT_DIR]   (default: protos/, i.e. in place)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
OUT=${1:-.}
"$PY" -m grpc_tools.protoc -I . \
    --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    deltawatch/v1/deltawatch.proto
# grpc_tools writes `from deltawatch.v1 import deltawatch_pb2`, which is the installed import name.
