"""PyTorch side of the fast-CPU-path benchmark (`cargo xtask bench`): ms/image of ResNet-18 and
Wide-ResNet-50-2 layer1..3 at 224 px (batch 1 and 8), single convolutions (+ bias + ReLU) of
every ResNet-18 layer1..3 shape at batch 8, and one training step of ResNet-18 layer1..3 at
batch 8 (frozen stem, loss = sum(layer3 · r), SGD step), with `--threads` threads.

    python3 tools/bench/torch_conv.py [--threads 2]
"""
import argparse
import time

import torch
import torchvision

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)


def layers(m, x):
    h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer3(m.layer2(m.layer1(h)))


def timeit(f, reps):
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps


with torch.no_grad():
    for name, ctor in (("resnet18", torchvision.models.resnet18), ("wide_resnet50_2", torchvision.models.wide_resnet50_2)):
        m = ctor().eval()
        for b in (1, 8):
            x = torch.randn(b, 3, 224, 224)
            s = timeit(lambda: layers(m, x), max(3, 16 // b))
            print(f"| PyTorch {torch.__version__} {name} layer1..3, batch{b} ({args.threads} threads) | {s / b * 1e3:.1f} ms/image |")

with torch.no_grad():
    for cin, cout, k, s, hw in ((3, 64, 7, 2, 224), (64, 64, 3, 1, 56), (64, 128, 3, 2, 56),
                                (128, 128, 3, 1, 28), (64, 128, 1, 2, 56), (128, 256, 3, 2, 28),
                                (256, 256, 3, 1, 14)):
        x = torch.randn(8, cin, hw, hw)
        w = torch.randn(cout, cin, k, k) * (2.0 / (cin * k * k)) ** 0.5
        b = torch.zeros(cout)
        t = timeit(lambda: torch.relu(torch.nn.functional.conv2d(x, w, b, s, k // 2)), 10)
        print(f"| PyTorch conv {cin}x{hw}->{cout}_k{k}s{s}, batch 8 ({args.threads} threads) | {t * 1e3:.2f} ms |")

m = torchvision.models.resnet18().train()
for mod in m.modules():  # batch norm keeps its statistics (eval mode), as in SBM
    if isinstance(mod, torch.nn.BatchNorm2d):
        mod.eval()
params = [p for n, p in m.named_parameters() if n.startswith(("layer1", "layer2", "layer3"))]
opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, nesterov=True)
x = torch.randn(8, 3, 224, 224)
with torch.no_grad():
    stem = m.maxpool(m.relu(m.bn1(m.conv1(x))))
r = torch.randn(8, 256, 14, 14)


def step():
    opt.zero_grad()
    loss = (m.layer3(m.layer2(m.layer1(stem))) * r).sum()
    loss.backward()
    opt.step()


s = timeit(step, 3)
print(f"| PyTorch training step R18 layer1..3, batch 8 ({args.threads} threads) | {s * 1e3:.0f} ms |")
