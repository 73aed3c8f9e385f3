"""GPU check: a few bf16 SFT and DPO steps on one CUDA GPU with our trainers and with stock TRL, on the same weights
and rows; asserts equal first losses and prints tokens/s (SFT), pairs/s (DPO) and peak GPU memory of both.

    python scripts/check_gpu.py --prepare            # here, where PyPI answers: wheels + GPT-2's tokenizer in .whl/
    python3 scripts/check_gpu.py --output_json gpu_check.json     # on the GPU machine, with .whl/ carried

The logic, the install command for the GPU machine and the tolerances are in `benchmarks/gpu_check.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks` is a folder, not installed

from benchmarks.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    main()
