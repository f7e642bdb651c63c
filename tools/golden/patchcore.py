"""Golden values for tessera-patchcore (run by hand; needs torch).

    python3 tools/golden/patchcore.py

anomalib's PatchCore feature path: AvgPool2d(3, 1, 1) per level, layer3 upsampled bilinearly
(align_corners=False) to layer2's grid, concatenation; the official target-dimension
reduction (adaptive_avg_pool1d over channels); and 1-NN distances by torch.cdist.
Writes crates/tessera-patchcore/tests/golden/patchcore_small.safetensors.
"""
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
g = torch.Generator().manual_seed(11)
l1 = torch.randn(2, 4, 16, 16, generator=g)
l2 = torch.randn(2, 8, 8, 8, generator=g)
l3 = torch.randn(2, 16, 4, 4, generator=g)
pool = torch.nn.AvgPool2d(3, 1, 1)
a, b = pool(l2), pool(l3)
emb = torch.cat([a, F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)], 1)
b_, c, h, w = emb.shape
flat = emb.permute(0, 2, 3, 1).reshape(-1, c)
reduced = F.adaptive_avg_pool1d(flat[:, None, :], 10)[:, 0, :]
bank = torch.randn(50, c, generator=g)
d = torch.cdist(flat, bank)
out = {
    "l1": l1, "l2": l2, "l3": l3, "embed": emb, "embed_reduced10": reduced.reshape(b_, h, w, 10).permute(0, 3, 1, 2),
    "bank": bank, "nn_dist": d.min(1).values, "nn_idx": d.argmin(1).to(torch.int64),
}
p = ROOT / "crates/tessera-patchcore/tests/golden/patchcore_small.safetensors"
save_file({k: v.contiguous() for k, v in out.items()}, p)
print(p.relative_to(ROOT), p.stat().st_size, "bytes")
