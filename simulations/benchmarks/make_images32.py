"""A generated 32x32 RGB classification set (class means plus noise): `make_images32.py OUT.npz [N]`."""
import sys

import numpy as np

n = int(sys.argv[2]) if len(sys.argv) > 2 else 8900
rng = np.random.default_rng(0)
y = rng.integers(0, 10, n)
means = rng.normal(0, 1, (10, 3, 32, 32)).astype(np.float32)
x = (means[y] + rng.normal(0, 2, (n, 3, 32, 32))).astype(np.float32)
np.savez(sys.argv[1], x=x, y=y.astype(np.int64))
print(sys.argv[1], x.shape)
