"""Golden trajectories for tessera-optim (run by hand; needs torch).

    python3 tools/golden/optim.py

Minimises a fixed non-quadratic loss, sum(w**4)/4 + sum(sin(w) * c), for 5 steps with
torch.optim.AdamW(amsgrad=True/False) and torch.optim.SGD(momentum, nesterov, weight decay),
recording the parameters after every step. Writes crates/tessera-optim/tests/golden/optim.safetensors.
"""
import pathlib

import torch
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
g = torch.Generator().manual_seed(3)
w0 = torch.randn(4, 3, generator=g)
c = torch.randn(4, 3, generator=g)
out = {"w0": w0, "c": c}


def run(name, make):
    w = torch.nn.Parameter(w0.clone())
    opt = make([w])
    traj = []
    for _ in range(5):
        opt.zero_grad()
        loss = (w ** 4).sum() / 4 + (torch.sin(w) * c).sum()
        loss.backward()
        opt.step()
        traj.append(w.detach().clone())
    out[name] = torch.stack(traj)


run("adamw_amsgrad", lambda p: torch.optim.AdamW(p, lr=1e-1, weight_decay=5e-4, amsgrad=True))
run("adamw", lambda p: torch.optim.AdamW(p, lr=1e-1, weight_decay=5e-4, amsgrad=False))
run("sgd_nesterov", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=5e-4))
run("sgd_momentum", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.0))
p = ROOT / "crates/tessera-optim/tests/golden/optim.safetensors"
save_file({k: v.contiguous() for k, v in out.items()}, p)
print(p.relative_to(ROOT), p.stat().st_size, "bytes")
