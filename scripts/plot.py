"""Draw PNG figures of a training run from its trainer_state.json.

    python scripts/plot.py outputs/dpo-run [--out DIR]

Prints one line per written file. A missing run folder or trainer_state.json is reported in one line on
stderr with exit code 1, since a traceback would only bury the one thing the user needs to fix. The command lives
in `alignment.evaluation.plotting.main`.
"""

from __future__ import annotations

import sys

from alignment.evaluation.plotting import main

if __name__ == "__main__":
    sys.exit(main())
