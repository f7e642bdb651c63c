"""Golden values for tessera-padim (run by hand; needs torch + numpy).

    python3 tools/golden/padim.py

Follows the PaDiM reference: nearest upsampling of level 2 to level 1's grid, concatenation,
per-position mean and unbiased covariance + 0.01·I, Mahalanobis distance per position. All
channels are kept (so no random subset is involved). Writes
crates/tessera-padim/tests/golden/padim_small.safetensors.
"""
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
g = torch.Generator().manual_seed(5)
train1 = torch.randn(12, 3, 4, 6, generator=g)
train2 = torch.randn(12, 2, 2, 3, generator=g) * 2 + 1
test1 = torch.randn(3, 3, 4, 6, generator=g) * 1.5
test2 = torch.randn(3, 2, 2, 3, generator=g)


def embed(a, b):
    return torch.cat([a, F.interpolate(b, size=a.shape[-2:], mode="nearest")], 1)


e = embed(train1, train2).double()
n, c, h, w = e.shape
e = e.reshape(n, c, h * w)
mean = e.mean(0)
cov = np.zeros((c, c, h * w))
for i in range(h * w):
    cov[:, :, i] = np.cov(e[:, :, i].numpy(), rowvar=False) + 0.01 * np.identity(c)
t = embed(test1, test2).double().reshape(3, c, h * w)
dist = np.zeros((3, h * w))
for i in range(h * w):
    inv = np.linalg.inv(cov[:, :, i])
    for j in range(3):
        d = (t[j, :, i] - mean[:, i]).numpy()
        dist[j, i] = np.sqrt(d @ inv @ d)
out = {
    "train1": train1, "train2": train2, "test1": test1, "test2": test2,
    "dist": torch.from_numpy(dist.reshape(3, h, w)).float(),
}
p = ROOT / "crates/tessera-padim/tests/golden/padim_small.safetensors"
save_file({k: v.contiguous() for k, v in out.items()}, p)
print(p.relative_to(ROOT), p.stat().st_size, "bytes")
