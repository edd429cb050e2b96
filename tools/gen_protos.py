"""Generate the Python gRPC modules from protos/ into the importable package ``anagram``.

Run ``python tools/gen_protos.py`` (or ``make protos``); ``pip install`` runs it too (setup.py).
The output is not committed and must never be edited by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path


def generate(root: Path | None = None) -> list[Path]:
    """Compile every ``protos/**/*.proto`` under ``root`` into ``root/anagram/...``."""
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)

    root = Path(root or Path(__file__).resolve().parents[1])
    proto_dir = root / "protos"
    protos = sorted(proto_dir.rglob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_dir}")
    include = Path(protoc.__file__).parent / "_proto"
    for proto in protos:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    # Make every generated folder a regular package.
    for folder in {p.relative_to(proto_dir).parent for p in protos}:
        for depth in range(1, len(folder.parts) + 1):
            init = root.joinpath(*folder.parts[:depth]) / "__init__.py"
            init.touch()
    return protos


if __name__ == "__main__":
    done = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"generated {len(done)} proto file(s) into anagram/")
