"""Golden values for tessera-eval's pixel metrics (run by hand; needs numpy, scipy, scikit-learn
and safetensors).

    python3 tools/golden/metrics.py

Six seeded 64×64 anomaly maps with ground-truth masks (two normal images, four with blobs of
different sizes, a one-pixel defect and a pair of pixels touching only at a corner), half of
them quantised so that scores tie within and across images. Computes

* AUPRO the way MVTec AD's reference evaluation code does (`compute_pro` +
  `trapezoid(fpr, pro, x_max=limit) / limit`): regions are `scipy.ndimage.label` components with
  a 3×3 structure of ones (8-connectivity); each pixel of a region adds 1/|region| to the PRO
  sum, each normal pixel (of every image) 1 to the FP count; scores are sorted once in
  descending order, only the last point of each run of tied scores is kept, the curve gets
  (0, 0) in front and (1, 1) at the end, and the trapezoid rule runs up to the limit with the
  curve interpolated linearly there. MVTec's code keeps the FPRs in float32; `aupro_*` here
  are computed in float64 throughout, `aupro_*_f32` with float32 FPRs as the reference does.
* pixel AUROC (`sklearn.metrics.roc_auc_score`) and pixel F1-max (`precision_recall_curve`),
  pooled over all pixels; the F1-max threshold is the highest score reaching the best F1;
* image AUROC / F1-max of the maps' maxima (image label: the mask has a defect pixel).

Writes crates/tessera-eval/tests/golden/metrics.safetensors: `maps` (6×64×64 f32), `masks`
(6×64×64 u8), `labels` (6×64×64 u8, the scipy component labels), `components` (6, i64), and
the expected values as f64 scalars of shape [1].
"""
import pathlib
from bisect import bisect_right

import numpy as np
from scipy import ndimage
from safetensors.numpy import save_file
from sklearn.metrics import precision_recall_curve, roc_auc_score

ROOT = pathlib.Path(__file__).resolve().parents[2]
N, H, W = 6, 64, 64
rng = np.random.default_rng(20240611)


def ellipse(m, cy, cx, ry, rx):
    y, x = np.mgrid[0:H, 0:W]
    m |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


masks = np.zeros((N, H, W), dtype=bool)
# Image 2: a large and a small blob.
ellipse(masks[2], 20, 22, 9, 12)
ellipse(masks[2], 48, 45, 3, 2)
# Image 3: a one-pixel defect, a corner-touching pair (one region with 8-connectivity, two
# with 4), and a thin diagonal line.
masks[3, 10, 10] = True
masks[3, 30, 30] = True
masks[3, 31, 31] = True
for i in range(12):
    masks[3, 40 + i, 5 + i] = True
# Image 4: three random blobs.
for _ in range(3):
    ellipse(masks[4], rng.integers(8, 56), rng.integers(8, 56), rng.integers(2, 8), rng.integers(2, 8))
# Image 5: one large blob covering a corner.
ellipse(masks[5], 58, 58, 14, 18)

noise = rng.normal(size=(N, H, W))
maps = np.stack([ndimage.gaussian_filter(noise[i], 1.5) for i in range(N)])
maps = maps / maps.std()
# Defects raise the score, by different amounts per image (image 3 barely).
gain = [0.0, 0.0, 2.0, 0.4, 1.2, 1.6]
for i in range(N):
    bump = ndimage.gaussian_filter(masks[i].astype(np.float64), 1.0)
    maps[i] += gain[i] * bump / max(bump.max(), 1e-9) + rng.normal(scale=0.3, size=(H, W))
# Quantise half of the maps so scores tie within and across images.
for i in (0, 2, 4):
    maps[i] = np.round(maps[i] * 8.0) / 8.0
maps = maps.astype(np.float32)

structure = np.ones((3, 3), dtype=int)
labels = np.zeros((N, H, W), dtype=np.uint8)
components = np.zeros(N, dtype=np.int64)
for i in range(N):
    lab, n = ndimage.label(masks[i], structure)
    assert n < 256
    labels[i] = lab
    components[i] = n
four = sum(ndimage.label(masks[i])[1] for i in range(N))
assert four > components.sum(), "the data should tell 8- from 4-connectivity"


def pro_curve(maps, labels, fpr_dtype):
    """(fpr, pro) as MVTec's compute_pro builds them."""
    fp_change = np.zeros(maps.shape, dtype=np.float64)
    pro_change = np.zeros(maps.shape, dtype=np.float64)
    regions = 0
    for i in range(len(maps)):
        fp_change[i][labels[i] == 0] = 1.0
        for k in range(1, labels[i].max() + 1):
            region = labels[i] == k
            pro_change[i][region] = 1.0 / region.sum()
        regions += labels[i].max()
    normal = fp_change.sum()
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores = maps.ravel()[order]
    fpr = (np.cumsum(fp_change.ravel()[order]).astype(fpr_dtype) / fpr_dtype(normal)).astype(np.float64)
    pro = np.cumsum(pro_change.ravel()[order]) / regions
    keep = np.append(np.diff(scores) != 0, True)
    fpr, pro = np.minimum(fpr[keep], 1.0), np.minimum(pro[keep], 1.0)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def trapezoid(x, y, x_max):
    """MVTec's trapezoid(x, y, x_max): cut at x_max, interpolating linearly there."""
    correction = 0.0
    if x_max not in x:
        ins = bisect_right(x, x_max)
        assert 0 < ins < len(x)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def f1_max(scores, truth):
    """sklearn's best F1, and the highest threshold reaching it (exact integer counts)."""
    p, r, t = precision_recall_curve(truth, scores)
    f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)[:-1]
    best = f.max()
    # The same sweep with exact counts: thresholds descending, ties admitted together.
    order = np.argsort(-scores, kind="stable")
    s, l = scores[order], truth[order]
    last = np.append(np.diff(s) != 0, True)
    tp = np.cumsum(l)[last]
    fp = np.cumsum(~l)[last]
    f_exact = 2 * tp / (tp + fp + truth.sum())
    k = int(np.argmax(f_exact))  # first in descending order: the highest threshold
    assert abs(f_exact[k] - best) < 1e-12, (f_exact[k], best)
    return best, s[last][k]


out = {"maps": maps, "masks": masks.astype(np.uint8), "labels": labels, "components": components}
for limit, name in [(0.3, "30"), (0.05, "05"), (1.0, "100")]:
    x, y = pro_curve(maps, labels, np.float64)
    out[f"aupro_{name}"] = np.array([trapezoid(x, y, limit) / limit])
    x, y = pro_curve(maps, labels, np.float32)
    out[f"aupro_{name}_f32"] = np.array([trapezoid(x, y, limit) / limit])

px_s, px_l = maps.ravel().astype(np.float64), masks.ravel()
out["pixel_auroc"] = np.array([roc_auc_score(px_l, px_s)])
f, t = f1_max(px_s, px_l)
out["pixel_f1_max"] = np.array([f])
out["pixel_threshold"] = np.array([t], dtype=np.float32)
im_s = maps.reshape(N, -1).max(1).astype(np.float64)
im_l = masks.reshape(N, -1).any(1)
out["image_auroc"] = np.array([roc_auc_score(im_l, im_s)])
f, t = f1_max(im_s, im_l)
out["image_f1_max"] = np.array([f])
out["image_threshold"] = np.array([t], dtype=np.float32)

p = ROOT / "crates/tessera-eval/tests/golden/metrics.safetensors"
p.parent.mkdir(parents=True, exist_ok=True)
save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(p))
for k, v in out.items():
    if v.size == 1:
        print(f"{k:>18} {v[0]!r}")
print("components", components.tolist(), "(4-connectivity:", four, "in total)")
print(p.relative_to(ROOT), p.stat().st_size, "bytes")
