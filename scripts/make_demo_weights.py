"""Train the demo's anchor and teacher from a random init and write them as bf16 safetensors.

    .venv/bin/python scripts/make_demo_weights.py [--out sidecar/demo/weights]

See deltawatch.sidecar.demo.anchor: the anchor ("the shared SFT anchor") is a partly competent
tiny Qwen3, the teacher the same supervised run continued until it is near perfect. Deterministic
seeds, no download, a few minutes on a CPU; the output is two safetensors files (no pickle).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deltawatch.sidecar.demo import anchor
from deltawatch.sidecar.demo import model as demo_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=demo_model.WEIGHTS_DIR)
    parser.add_argument(
        "--teacher-only", action="store_true", help="keep an existing anchor, train the teacher"
    )
    args = parser.parse_args(argv)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    anchor.make_weights(args.out, log=log, teacher_only=args.teacher_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
