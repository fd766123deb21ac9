"""Write every registered fixture case to tests/fixtures/<group>/<name>.onnx.

    python scripts/make_fixtures.py            # all cases
    python scripts/make_fixtures.py --only fc_to_conv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402

from tests.fixtures.cases import case_path, discover  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="only cases in this group (repeatable)")
    args = parser.parse_args()
    for name, build in sorted(discover().items()):
        if args.only and name.split("/")[0] not in args.only:
            continue
        path = case_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(build(), str(path))
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
