"""Golden tensors for tessera-backbone parity tests (run by hand; needs torch + torchvision).

    python3 tools/golden/backbone.py [--shared ../shared]

Writes, under crates/tessera-backbone/tests/golden/:
- resnet18_real.safetensors: a fixed input and torchvision resnet18's layer1..3 outputs with the
  real ImageNet weights from ../shared/weights (the weights themselves are not copied), plus
  random batch-norm statistics (bnstat.*) and the outputs with those statistics swapped in, so
  that batch-norm folding is checked on non-trivial statistics.
- bottleneck_small.safetensors: a small torchvision Bottleneck ResNet ([1,1] blocks,
  width_per_group=16) with random weights and random batch-norm statistics, its input and its
  layer1..2 outputs (the whole model is stored: it is small).
"""
import argparse
import pathlib

import torch
import torchvision
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/tessera-backbone/tests/golden"


def features(model, x, depth):
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outs = []
    for i in range(1, depth + 1):
        h = getattr(model, f"layer{i}")(h)
        outs.append(h)
    return outs


def randomise_bn(model, g):
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 0.5 + torch.rand(c, generator=g)
            m.bias.data = 0.2 * torch.randn(c, generator=g)
            m.running_mean.data = 0.2 * torch.randn(c, generator=g)
            m.running_var.data = 0.5 + torch.rand(c, generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(20261129)

    # Real weights, real architecture.
    from safetensors.torch import load_file

    sd = load_file(pathlib.Path(args.shared) / "weights/resnet18-imagenet1k-l3.safetensors")
    m = torchvision.models.resnet18()
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("layer4", "fc")) for k in missing), missing
    m.eval()
    x = torch.randn(2, 3, 64, 96, generator=g)
    out = {"input": x}
    for i, f in enumerate(features(m, x, 3), 1):
        out[f"layer{i}"] = f.contiguous()
    randomise_bn(m, g)
    for k, v in m.state_dict().items():
        if ".bn" in k or k.startswith("bn1") or "downsample.1" in k:
            if not k.startswith(("layer4",)) and not k.endswith("num_batches_tracked"):
                out[f"bnstat.{k}"] = v.contiguous()
    for i, f in enumerate(features(m, x, 3), 1):
        out[f"bn_layer{i}"] = f.contiguous()
    save_file(out, OUT / "resnet18_real.safetensors")

    # Small bottleneck network, fully stored.
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(7)
    b = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=16)
    randomise_bn(b, g)
    b.eval()
    x = torch.randn(1, 3, 48, 40, generator=g)
    out = {"input": x}
    for k, v in b.state_dict().items():
        if k.startswith(("conv1", "bn1", "layer1", "layer2")) and not k.endswith("num_batches_tracked"):
            out[f"model.{k}"] = v.contiguous()
    for i, f in enumerate(features(b, x, 2), 1):
        out[f"layer{i}"] = f.contiguous()
    save_file(out, OUT / "bottleneck_small.safetensors")
    for p in sorted(OUT.glob("*.safetensors")):
        print(p.relative_to(ROOT), p.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
