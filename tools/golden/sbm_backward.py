"""Golden gradients for the SBM trainer's backward pass (run by hand; needs torch + torchvision).

    python3 tools/golden/sbm_backward.py

A small ResNet in torchvision names (BasicBlock, base width 8, blocks [1, 2, 1]) whose batch
norms are identity-with-bias (weight 1, mean 0, var 1 - eps), i.e. exactly the folded form
Tessera trains. Stores the weights, an input, two random projections r1/r3 and the gradients of
loss = sum(layer1 * r1) + sum(layer3 * r3) with respect to every conv weight and bn bias of
layer1..3 (the stem is frozen in SBM training, so its gradients are not needed).
Writes crates/tessera-sbm/tests/golden/backward.safetensors.
"""
import pathlib

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/tessera-sbm/tests/golden"
EPS = 1e-5


class Small(nn.Module):
    def __init__(self, base=8, blocks=(1, 2, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = base
        for li, n in enumerate(blocks):
            planes = base << li
            stride = 1 if li == 0 else 2
            layers = []
            for bi in range(n):
                s = stride if bi == 0 else 1
                down = None
                if bi == 0 and (s != 1 or cin != planes):
                    down = nn.Sequential(nn.Conv2d(cin, planes, 1, s, bias=False), nn.BatchNorm2d(planes))
                layers.append(BasicBlock(cin, planes, s, down))
                cin = planes
            setattr(self, f"layer{li + 1}", nn.Sequential(*layers))

    def forward(self, x):
        with torch.no_grad():  # the frozen stem
            h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        l1 = self.layer1(h)
        l3 = self.layer3(self.layer2(l1))
        return l1, l3


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(20261129)
    m = Small().double()
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Conv2d):
            mod.weight.data = torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * (2.0 / mod.weight[0].numel()) ** 0.5
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.weight.data = torch.ones(c, dtype=torch.float64)
            mod.bias.data = 0.1 * torch.randn(c, generator=g, dtype=torch.float64)
            mod.running_mean.data = torch.zeros(c, dtype=torch.float64)
            mod.running_var.data = torch.full((c,), 1 - EPS, dtype=torch.float64)
    m.eval()
    x = torch.randn(2, 3, 40, 40, generator=g, dtype=torch.float64)
    l1, l3 = m(x)
    r1 = torch.randn(l1.shape, generator=g, dtype=torch.float64)
    r3 = torch.randn(l3.shape, generator=g, dtype=torch.float64)
    loss = (l1 * r1).sum() + (l3 * r3).sum()
    loss.backward()
    out = {"x": x, "r1": r1, "r3": r3, "l3": l3.detach()}
    for k, v in m.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        out[f"w.{k}"] = v
    for k, p in m.named_parameters():
        if k.startswith("layer") and (k.endswith("conv1.weight") or k.endswith("conv2.weight")
                                      or k.endswith("downsample.0.weight") or k.endswith(".bias")):
            assert p.grad is not None, k
            out[f"grad.{k}"] = p.grad
    out = {k: v.float().contiguous() for k, v in out.items()}
    save_file(out, OUT / "backward.safetensors")
    print("wrote", OUT / "backward.safetensors", len(out), "tensors")


if __name__ == "__main__":
    main()
