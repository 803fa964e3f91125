"""How fast the demo's synthetic photo generator is: prints images per second.

Run: python benchmarks/synthetic_speed.py [N] [SIZE]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from vlm_inspect.data.synthetic import write_dataset_folders


def main(n: int = 300, size: int = 128) -> None:
    """Write n photos (half OK, half NG) to a temporary folder and print the rate."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_dataset_folders(Path(tmp) / "photos", n_ok=n // 2, n_ng=n - n // 2, seed=0, size=size)
        seconds = time.perf_counter() - start
    print(f"{n} photos at {size} px in {seconds:.2f} s: {n / seconds:.0f} images/s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
