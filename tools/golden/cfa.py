"""Golden values for tessera-cfa (run by hand; needs torch).

    python3 tools/golden/cfa.py

Re-states the reference CFA code (Descriptor with CoordConv, DSVDD soft-boundary loss with
K = J = 3, 1/ν = 1000, α = 0.1, softmin score) on a fixed small input and takes one
torch.optim.AdamW(amsgrad=True, lr=1e-3, weight_decay=5e-4) step. Writes
crates/tessera-cfa/tests/golden/cfa_small.safetensors.
"""
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
g = torch.Generator().manual_seed(21)
l1 = torch.randn(2, 4, 8, 6, generator=g)
l2 = torch.randn(2, 6, 4, 3, generator=g)
l3 = torch.randn(2, 8, 2, 2, generator=g)


def add_coords(x):  # the reference AddCoords (x_dim = H, y_dim = W)
    b, _, x_dim, y_dim = x.size()
    xx = torch.arange(x_dim).repeat(1, y_dim, 1).float() / (x_dim - 1) * 2 - 1
    yy = torch.arange(y_dim).repeat(1, x_dim, 1).transpose(1, 2).float() / (y_dim - 1) * 2 - 1
    xx = xx.repeat(b, 1, 1, 1).transpose(2, 3)
    yy = yy.repeat(b, 1, 1, 1).transpose(2, 3)
    return torch.cat([x, xx, yy], 1)


sample = None
for o in (l1, l2, l3):
    o = F.avg_pool2d(o, 3, 1, 1)
    sample = o if sample is None else torch.cat((sample, F.interpolate(o, sample.shape[-2:], mode="bilinear")), 1)
c = sample.shape[1]
conv = torch.nn.Conv2d(c + 2, c, 1)
torch.nn.init.uniform_(conv.weight, -0.3, 0.3, generator=g)
torch.nn.init.uniform_(conv.bias, -0.3, 0.3, generator=g)
w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
phi = conv(add_coords(sample))
phi_rows = phi.permute(0, 2, 3, 1).reshape(2, -1, c)  # b (h w) c
# Centres: the mean descriptor per location (γ_c = 1), then as the reference: C is c × HW.
C = phi_rows.mean(0).detach().T + 0.05 * torch.randn(c, 48, generator=g)
r = torch.nn.Parameter(torch.tensor([0.3]))
K, J, nu, alpha = 3, 3, 1e-3, 0.1


def dists(p):
    return (p.pow(2).sum(2, keepdim=True) + C.pow(2).sum(0, keepdim=True) - 2 * p @ C)


d = dists(phi_rows).topk(K + J, largest=False).values
L_att = (1 / nu) * torch.mean(torch.clamp(d[:, :, :K] - r ** 2, min=0))
L_rep = (1 / nu) * torch.mean(torch.clamp(r ** 2 - d[:, :, J:] - alpha, min=0))
loss = L_att + L_rep
opt = torch.optim.AdamW(list(conv.parameters()) + [r], lr=1e-3, weight_decay=5e-4, amsgrad=True)
opt.zero_grad()
loss.backward()
opt.step()
with torch.no_grad():
    ds = dists(phi_rows).topk(K, largest=False).values
    score = F.softmin(ds, dim=-1)[:, :, 0] * ds[:, :, 0]
out = {
    "l1": l1, "l2": l2, "l3": l3, "sample": sample, "w0": w0.reshape(c, c + 2), "b0": b0,
    "centres": C.T.contiguous(), "loss": loss.detach().reshape(1), "w1": conv.weight.detach().reshape(c, c + 2),
    "b1": conv.bias.detach(), "r1": r.detach(), "score": score.reshape(2, 8, 6),
}
p = ROOT / "crates/tessera-cfa/tests/golden/cfa_small.safetensors"
save_file({k: v.contiguous() for k, v in out.items()}, p)
print(p.relative_to(ROOT), p.stat().st_size, "bytes", "loss", float(loss.detach()))
