"""``python -m quotagate.openwebui function|pipeline|refusal-pipe``: print a file to install."""

from __future__ import annotations

import sys

from quotagate.openwebui import function_source, pipeline_source, refusal_pipe_source


def main(argv: list[str]) -> int:
    if argv == ["function"]:
        sys.stdout.write(function_source())
        return 0
    if argv == ["pipeline"]:
        sys.stdout.write(pipeline_source())
        return 0
    if argv == ["refusal-pipe"]:
        sys.stdout.write(refusal_pipe_source())
        return 0
    print("usage: python -m quotagate.openwebui function|pipeline|refusal-pipe", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
