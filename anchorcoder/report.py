"""Compare finished eval runs: a table per benchmark and the trade-off plots.

    python -m anchorcoder.report outputs/eval/multirun_2026-12-07_16-00-00            # a sweep
    python -m anchorcoder.report outputs/eval/<run> outputs/eval/<other run> --out cmp  # any mix of runs
    make report RUNS="outputs/eval/multirun_..."

Writes ``report.md`` (quality with its 95 % interval over problems, measured KV reduction final and
peak, decode speed, wall time, and a paired sign test against dense), ``report.json`` and PNG plots
into ``--out`` (default: the first folder given). Unfinished runs are listed as such.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anchorcoder.reporting.compare import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m anchorcoder.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders holding them (a multirun)")
    parser.add_argument("--out", type=Path, help="where report.md and the plots go (default: the first folder)")
    parser.add_argument("--no-plots", action="store_true", help="the table only")
    args = parser.parse_args(argv)
    try:
        runs, images = write_report(args.runs, args.out or args.runs[0], plots=not args.no_plots)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not runs:
        print(
            f"error: no eval run folder (one holding config.yaml) under {', '.join(map(str, args.runs))}",
            file=sys.stderr,
        )
        return 2
    out = args.out or args.runs[0]
    print((out / "report.md").read_text())
    print(f"wrote {out / 'report.md'}" + (f" and {len(images)} plot(s)" if images else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
