"""Write a copy of an image .npz without its training labels (x_train, x_test, y_test), as a
user who protects a service with unlabelled images has it: ``fides protect`` then has no
labels to spot-check the service with, and scores accuracy on the test labels only.

    python scripts/without_labels.py ../shared/data/fashion_mnist.npz \
        runs/fashion_mnist_unlabelled.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(src: Path, dst: Path) -> None:
    with np.load(src, allow_pickle=False) as z:
        kept = {k: z[k] for k in ("x_train", "x_test", "y_test", "classes") if k in z.files}
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst, **kept)
    print(f"{dst}: {', '.join(f'{k} {list(v.shape)}' for k, v in kept.items())}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
