"""The same PatchCore steps in PyTorch (anomalib's implementation style), for side-by-side
timing with `cargo xtask bench`.

    python3 tools/bench/torch_patchcore.py --weights ../shared/weights/resnet18-imagenet1k-l3.safetensors \
        --data ../shared/data/mvtec_ad/bottle [--ratio 0.1] [--threads 2]

Features: layer2 + layer3, AvgPool2d(3,1,1), bilinear upsampling, concatenation. Coreset:
anomalib's KCenterGreedy (sparse random projection to 128 dims replaced by a Gaussian one;
per-iteration torch.linalg.norm over all points). Scoring: torch.cdist 1-NN, bilinear
upsampling, scipy Gaussian blur σ=4. Prints markdown table rows.
"""
import argparse
import glob
import os
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import load_file
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

ap = argparse.ArgumentParser()
ap.add_argument("--weights", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--ratio", type=float, default=0.1)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.set_grad_enabled(False)
tf = torchvision.transforms.Compose([
    torchvision.transforms.Resize(256), torchvision.transforms.CenterCrop(224), torchvision.transforms.ToTensor(),
    torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])
mtf = torchvision.transforms.Compose([
    torchvision.transforms.Resize(256, interpolation=torchvision.transforms.InterpolationMode.NEAREST),
    torchvision.transforms.CenterCrop(224), torchvision.transforms.ToTensor(),
])
m = torchvision.models.resnet18()
m.load_state_dict(load_file(args.weights), strict=False)
m.eval()
pool = torch.nn.AvgPool2d(3, 1, 1)


def embed(x):
    h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    l2 = m.layer2(m.layer1(h))
    l3 = m.layer3(l2)
    a, b = pool(l2), pool(l3)
    e = torch.cat([a, F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)], 1)
    return e.permute(0, 2, 3, 1).reshape(-1, e.shape[1])


t0 = time.perf_counter()
train = sorted(glob.glob(os.path.join(args.data, "train/good/*.png")))
feats = torch.cat([embed(torch.stack([tf(Image.open(p).convert("RGB")) for p in train[i:i + 8]]))
                   for i in range(0, len(train), 8)])
t1 = time.perf_counter()
n = feats.shape[0]
k = int(n * args.ratio)
torch.manual_seed(0)
proj = feats @ torch.randn(feats.shape[1], 128)
min_d = None
idx = [int(torch.randint(n, (1,)))]
for _ in range(k - 1):
    d = torch.linalg.norm(proj - proj[idx[-1]], dim=1, keepdim=True)
    min_d = d if min_d is None else torch.minimum(min_d, d)
    idx.append(int(torch.argmax(min_d)))
bank = feats[idx]
t2 = time.perf_counter()
print(f"| PyTorch {torch.__version__} coreset {args.ratio:g} on bottle ({n} patches → {k}) | {t2 - t1:.1f} s |")
print(f"| PyTorch PatchCore fit on bottle (features {t1 - t0:.1f} s + coreset) | {t2 - t0:.1f} s |")


def score(x):
    e = embed(x)
    b = x.shape[0]
    d = torch.cdist(e, bank).min(1).values.reshape(b, 1, 28, 28)
    up = F.interpolate(d, size=224, mode="bilinear", align_corners=False).squeeze(1).numpy()
    return np.stack([gaussian_filter(u, sigma=4) for u in up])


for b in (1, 8):
    x = torch.zeros(b, 3, 224, 224)
    score(x)
    reps = max(2, 16 // b)
    t = time.perf_counter()
    for _ in range(reps):
        score(x)
    ms = (time.perf_counter() - t) / reps / b * 1e3
    print(f"| PyTorch PatchCore features + 1-NN + blur, batch{b} ({args.threads} threads) | {ms:.1f} ms/image |")
labels, scores, pl, ps = [], [], [], []
for t in sorted(os.listdir(os.path.join(args.data, "test"))):
    for p in sorted(glob.glob(os.path.join(args.data, "test", t, "*.png"))):
        s = score(tf(Image.open(p).convert("RGB"))[None])[0]
        mk = np.zeros((224, 224)) if t == "good" else mtf(Image.open(os.path.join(
            args.data, "ground_truth", t, os.path.splitext(os.path.basename(p))[0] + "_mask.png")))[0].numpy()
        labels.append(t != "good"); scores.append(s.max()); pl.append(mk.ravel() > 0.5); ps.append(s.ravel())
print(f"| PyTorch PatchCore bottle image / pixel AUROC | {roc_auc_score(labels, scores):.4f} / "
      f"{roc_auc_score(np.concatenate(pl), np.concatenate(ps)):.4f} |")
print(f"| PyTorch PatchCore peak RSS | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB |")
