"""The committed protobuf/gRPC modules are what the pinned grpcio-tools generates from the .proto,
and importing the client never pulls in the sidecar's dependencies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
GENERATED = ("deltawatch_pb2.py", "deltawatch_pb2_grpc.py", "deltawatch_pb2.pyi")


def test_generated_code_is_fresh(tmp_path):
    from importlib.metadata import version

    assert version("grpcio-tools") == "1.85.1", "regenerate with the pinned grpcio-tools==1.85.1"
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTOS),
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            "deltawatch/v1/deltawatch.proto",
        ],
        check=True,
    )  # fmt: skip
    for name in GENERATED:
        fresh = (tmp_path / "deltawatch" / "v1" / name).read_bytes()
        committed = (PROTOS / "deltawatch" / "v1" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run protos/generate.sh and commit"


def test_generate_script_matches_the_test(tmp_path):
    subprocess.run(["bash", str(PROTOS / "generate.sh"), str(tmp_path)], check=True)
    for name in GENERATED:
        assert (tmp_path / "deltawatch" / "v1" / name).read_bytes() == (
            PROTOS / "deltawatch" / "v1" / name
        ).read_bytes()


def test_client_import_stays_light():
    code = (
        "import sys\n"
        "import deltawatch.client\n"
        "from deltawatch.client import Monitor, MonitorConfig\n"
        "import deltawatch.client.transport, deltawatch.client.wire\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('aiohttp', 'prometheus_client', 'transformers') or m.startswith('deltawatch.sidecar'))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
