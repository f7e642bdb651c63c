"""The same PaDiM work in PyTorch, for side-by-side timing with `cargo xtask bench`.

    python3 tools/bench/torch_padim.py --weights ../shared/weights/resnet18-imagenet1k-l3.safetensors \
        --data ../shared/data/mvtec_ad/bottle [--threads 2]

Vectorised PaDiM as in the reference (nearest upsampling, 100 random channels, covariance +
0.01·I, batched inverse, Mahalanobis, bilinear upsample, scipy Gaussian blur σ=4), torchvision
resnet18 with the same weights, PIL preprocessing (resize 256, center crop 224). Prints
markdown table rows.
"""
import argparse
import glob
import os
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
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.set_grad_enabled(False)

tf = torchvision.transforms.Compose([
    torchvision.transforms.Resize(256),
    torchvision.transforms.CenterCrop(224),
    torchvision.transforms.ToTensor(),
    torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])
mtf = torchvision.transforms.Compose([
    torchvision.transforms.Resize(256, interpolation=torchvision.transforms.InterpolationMode.NEAREST),
    torchvision.transforms.CenterCrop(224),
    torchvision.transforms.ToTensor(),
])
m = torchvision.models.resnet18()
m.load_state_dict(load_file(args.weights), strict=False)
m.eval()


def feats(x):
    h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    l1 = m.layer1(h)
    l2 = m.layer2(l1)
    l3 = m.layer3(l2)
    e = torch.cat([l1, F.interpolate(l2, size=l1.shape[-2:], mode="nearest"),
                   F.interpolate(l3, size=l1.shape[-2:], mode="nearest")], 1)
    return e


torch.manual_seed(1024)
idx = torch.randperm(448)[:100]

t0 = time.perf_counter()
train = sorted(glob.glob(os.path.join(args.data, "train/good/*.png")))
embs = []
for i in range(0, len(train), 8):
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in train[i:i + 8]])
    embs.append(feats(x)[:, idx])
e = torch.cat(embs)  # N, d, H, W
n, d, h, w = e.shape
e = e.reshape(n, d, h * w).permute(2, 0, 1)  # P, N, d
mean = e.mean(1, keepdim=True)
xc = e - mean
cov = xc.transpose(1, 2) @ xc / (n - 1) + 0.01 * torch.eye(d)
inv = torch.linalg.inv(cov)
fit_s = time.perf_counter() - t0


def score(x):
    emb = feats(x)[:, idx]
    b = emb.shape[0]
    z = emb.reshape(b, d, h * w).permute(2, 0, 1) - mean  # P, B, d
    dist = ((z @ inv) * z).sum(-1).clamp_min(0).sqrt().T.reshape(b, 1, h, w)
    up = F.interpolate(dist, size=224, mode="bilinear", align_corners=False).squeeze(1).numpy()
    return np.stack([gaussian_filter(u, sigma=4) for u in up])


for b in (1, 8):
    x = torch.zeros(b, 3, 224, 224)
    score(x)
    reps = max(3, 24 // b)
    t = time.perf_counter()
    for _ in range(reps):
        score(x)
    ms = (time.perf_counter() - t) / reps / b * 1e3
    print(f"| PyTorch {torch.__version__} R18 features + PaDiM, batch{b} ({args.threads} threads) | {ms:.1f} ms/image |")

labels, scores, pix_l, pix_s = [], [], [], []
for t in sorted(os.listdir(os.path.join(args.data, "test"))):
    for p in sorted(glob.glob(os.path.join(args.data, "test", t, "*.png"))):
        s = score(tf(Image.open(p).convert("RGB"))[None])[0]
        if t == "good":
            mk = np.zeros((224, 224))
        else:
            stem = os.path.splitext(os.path.basename(p))[0]
            mk = mtf(Image.open(os.path.join(args.data, "ground_truth", t, stem + "_mask.png")))[0].numpy()
        labels.append(t != "good")
        scores.append(s.max())
        pix_l.append(mk.ravel() > 0.5)
        pix_s.append(s.ravel())
print(f"| PyTorch fit on bottle ({n} images, features + statistics) | {fit_s:.1f} s |")
print(f"| PyTorch bottle image / pixel AUROC | {roc_auc_score(labels, scores):.4f} / "
      f"{roc_auc_score(np.concatenate(pix_l), np.concatenate(pix_s)):.4f} |")
