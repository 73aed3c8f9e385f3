"""Draw PNG figures of a training run from its trainer_state.json.

    python scripts/plot.py outputs/dpo-run [--out DIR]

Prints one line per written file. A missing run folder or trainer_state.json is reported in one line on
stderr with exit code 1, since a traceback would only bury the one thing the user needs to fix.
"""

from __future__ import annotations

import argparse
import sys

from alignment.plotting import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run's output folder (with trainer_state.json or checkpoint-N/)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not paths:
        print(f"error: no metrics to plot in the log history of {args.run_dir}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
