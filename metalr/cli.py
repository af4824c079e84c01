"""``metalr`` command line: ``metalr [demo]`` runs the embedded default job; ``bench-step`` times steps."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    if command == "demo":
        from metalr.demo import main as demo

        return demo(argv)
    if command == "bench-step":
        from metalr.bench import main as bench

        return bench(argv)
    print(f"metalr: unknown command {command!r}; expected 'demo' or 'bench-step'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
