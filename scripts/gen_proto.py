"""Regenerate the committed protobuf modules in edgefold_proto/ from proto/*.proto.

    make proto            # or: .venv/bin/python scripts/gen_proto.py [--out DIR]

Uses the grpcio-tools release pinned in pyproject.toml, so the output is byte-for-byte
reproducible; tests/test_proto_stubs.py regenerates into a temporary folder and fails
when the committed modules drift from the .proto sources.
"""
import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(PROTO_DIR.glob("*.proto"))
    for src in sources:
        args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", src.name]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {src}")
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "edgefold_proto")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if args.out.is_relative_to(ROOT) else path)


if __name__ == "__main__":
    sys.exit(main())
