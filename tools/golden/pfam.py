"""Golden values for tessera-pfam (run by hand; needs torch and safetensors).

    python3 tools/golden/pfam.py

Re-states in PyTorch the blocks of the authors' public code (repository "JigsawBlock":
src/PFAM.py, src/block/MFCSAM.py with its `selfattention`, and FcaNet's
`MultiSpectralAttentionLayer` / `MultiSpectralDCTLayer` / `get_freq_indices('top16')` in
src/block/fca.py), generalised with the options tessera-pfam exposes:

- DCT grid: the feature size (tessera's default) or a fixed grid with adaptive average pooling
  (FcaNet's behaviour), or the authors' `c2wh` table; frequency factor max(1, size // 7);
- residual of the position attention: `fca` (paper eq. 6, + A_i) or `input` (the code, + F_i);
- one attention module shared by the scales (the code) or one per scale;
- fusion `scale-softmax` (the code, EPSANet style) or `concat` (paper eq. 7);
- scale order `descending` (the code's `out = cat(x_i, out)` loop) or `ascending`.

A literal re-statement of the authors' `mfcsa_module_layer_2` + `selfattention` (its missing
`out = bmm(v, attnᵀ)` line restored, as in the repository's FCSAM.py) is checked against the
general module before anything is written.

Inputs are stored as `in.*`, outputs as `out.<block>.*`, weights under the block's prefix.
Weights are seeded PyTorch defaults with the attention scales α set non-zero, so that every path
is exercised. Tensor names are tessera-pfam's. Writes
crates/tessera-pfam/tests/golden/pfam.safetensors.
"""
import math
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/tessera-pfam/tests/golden/pfam.safetensors"

# FcaNet get_freq_indices('top16'): (x = vertical, y = horizontal) on a 7×7 grid.
TOP16_X = [0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2]
TOP16_Y = [0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2]
C2WH = {64: 56, 128: 28, 256: 14, 512: 7}  # the authors' table (attended channels → grid)


def basis(pos, freq, n):  # FcaNet build_filter
    r = math.cos(math.pi * freq * (pos + 0.5) / n) / math.sqrt(n)
    return r if freq == 0 else r * math.sqrt(2)


def dct_filters(dh, dw, clamp=True):
    """16 × dh × dw; frequency factor ⌊size/7⌋ (clamped to ≥ 1 unless clamp=False: FcaNet)."""
    sh, sw = dh // 7, dw // 7
    if clamp:
        sh, sw = max(1, sh), max(1, sw)
    f = torch.zeros(16, dh, dw, dtype=torch.float64)
    for g, (u, v) in enumerate(zip(TOP16_X, TOP16_Y)):
        for i in range(dh):
            for j in range(dw):
                f[g, i, j] = basis(i, u * sh, dh) * basis(j, v * sw, dw)
    return f.float()


class FCA(nn.Module):
    """FcaNet MultiSpectralAttentionLayer with a DCT grid rule: 'feature', (h, w) or 'channels'."""

    def __init__(self, channel, reduction=16, grid="feature"):
        super().__init__()
        hid = max(1, channel // reduction)
        self.fc1 = nn.Linear(channel, hid, bias=False)
        self.fc2 = nn.Linear(hid, channel, bias=False)
        self.grid = grid

    def forward(self, x):
        n, c, h, w = x.shape
        if self.grid == "feature":
            dh, dw = h, w
        elif self.grid == "channels":
            dh = dw = C2WH[c]
        else:
            dh, dw = self.grid
        xp = x if (h, w) == (dh, dw) else F.adaptive_avg_pool2d(x, (dh, dw))
        # get_dct_filter: channel block g (of c/16 channels) uses frequency g.
        weight = dct_filters(dh, dw).repeat_interleave(c // 16, dim=0)
        y = (xp * weight).sum(dim=[2, 3])
        y = torch.sigmoid(self.fc2(F.relu(self.fc1(y))))
        return x * y.view(n, c, 1, 1)

    def named(self, p):
        return {f"{p}.fc1.weight": self.fc1.weight, f"{p}.fc2.weight": self.fc2.weight}


class PAM(nn.Module):
    """The position attention of the authors' `selfattention` (DANet PAM_Module)."""

    def __init__(self, c, qk_red=1, slope=0.01):
        super().__init__()
        cq = max(1, c // qk_red)
        self.query = nn.Conv2d(c, cq, 1)
        self.key = nn.Conv2d(c, cq, 1)
        self.value = nn.Conv2d(c, c, 1)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.slope = slope

    def attend(self, x):
        b, c, h, w = x.shape
        q = self.query(x).view(b, -1, h * w).permute(0, 2, 1)
        k = self.key(x).view(b, -1, h * w)
        v = self.value(x).view(b, -1, h * w)
        attn = torch.softmax(torch.bmm(q, k), dim=-1)
        out = torch.bmm(v, attn.permute(0, 2, 1)).view(b, c, h, w)
        return out if self.slope is None else F.leaky_relu(out, self.slope)

    def forward(self, x, residual):
        return self.alpha * self.attend(x) + residual

    def named(self, p):
        d = {}
        for n in ("query", "key", "value"):
            m = getattr(self, n)
            d[f"{p}.{n}.weight"] = m.weight
            d[f"{p}.{n}.bias"] = m.bias
        d[f"{p}.alpha"] = self.alpha
        return d


class MFCSAM(nn.Module):
    def __init__(self, c, kernels=(3, 5), groups=(1, 4), fusion="scale-softmax", residual="fca",
                 share=True, order="descending", grid="feature", qk_red=1, slope=0.01):
        super().__init__()
        s = len(kernels)
        self.s, self.cs = s, c // s
        self.convs = nn.ModuleList(
            nn.Conv2d(c, self.cs, k, padding=k // 2, groups=g, bias=False)
            for k, g in zip(kernels, groups))
        n_att = 1 if share else s
        self.fca = nn.ModuleList(FCA(self.cs, grid=grid) for _ in range(n_att))
        self.pam = nn.ModuleList(PAM(self.cs, qk_red, slope) for _ in range(n_att))
        self.fusion, self.residual, self.share, self.order = fusion, residual, share, order

    def forward(self, x):
        b, _, h, w = x.shape
        fs, es = [], []
        for i, conv in enumerate(self.convs):
            f = conv(x)
            j = 0 if self.share else i
            a = self.fca[j](f)
            es.append(self.pam[j](a, a if self.residual == "fca" else f))
            fs.append(f)
        if self.fusion == "concat":
            parts = es
        else:
            feats = torch.cat(fs, 1).view(b, self.s, self.cs, h, w)
            att = torch.softmax(torch.cat(es, 1).view(b, self.s, self.cs, h, w), dim=1)
            fw = feats * att
            parts = [fw[:, i] for i in range(self.s)]
        if self.order == "descending":
            out = None
            for p in parts:  # the authors' loop
                out = p if out is None else torch.cat((p, out), 1)
            return out
        return torch.cat(parts, 1)

    def named(self, p):
        d = {f"{p}.conv{i}.weight": c.weight for i, c in enumerate(self.convs)}
        for i, (f, a) in enumerate(zip(self.fca, self.pam)):
            tag = "" if self.share else str(i)
            d.update(f.named(f"{p}.fca{tag}"))
            d.update(a.named(f"{p}.pam{tag}"))
        return d


class PFAM(nn.Module):
    """src/PFAM.py's forward: x1 → conv1x1(x1) + MFCSAM(x1); x2; x3 → MFCSAM(x3)."""

    def __init__(self, c1, c3, bias=False, **kw):
        super().__init__()
        self.conv1_ = nn.Conv2d(c1, c1, 1, bias=bias)
        self.m1 = MFCSAM(c1, **kw)
        self.m3 = MFCSAM(c3, **kw)

    def forward(self, x1, x2, x3):
        return self.conv1_(x1) + self.m1(x1), x2, self.m3(x3)

    def named(self, p):
        d = {f"{p}.x1_conv.weight": self.conv1_.weight}
        if self.conv1_.bias is not None:
            d[f"{p}.x1_conv.bias"] = self.conv1_.bias
        d.update(self.m1.named(f"{p}.mfcsam1"))
        d.update(self.m3.named(f"{p}.mfcsam3"))
        return d


def set_alphas(module, values):
    pams = [m for m in module.modules() if isinstance(m, PAM)]
    for m, v in zip(pams, values):
        m.alpha.data.fill_(v)


# --- A literal re-statement of the authors' classes, to check the general module against. ---
class AuthorsSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.query = nn.Conv2d(c, c, 1)
        self.key = nn.Conv2d(c, c, 1)
        self.value = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.att_MSA = FCA(c, 16, (C2WH[c], C2WH[c]))

    def forward(self, inp):
        b, c, h, w = inp.shape
        d = self.att_MSA(inp)
        q = self.query(d).view(b, -1, h * w).permute(0, 2, 1)
        k = self.key(d).view(b, -1, h * w)
        v = self.value(d).view(b, -1, h * w)
        attn = torch.softmax(torch.bmm(q, k), dim=-1)
        out = torch.bmm(v, attn.permute(0, 2, 1)).view(*inp.shape)
        return self.gamma * F.leaky_relu(out) + inp


class AuthorsLayer2(nn.Module):
    def __init__(self, c, kernels=(3, 5, 7, 9), groups=(1, 4, 8, 16)):
        super().__init__()
        self.conv_1 = nn.Conv2d(c, c // 2, kernels[0], padding=kernels[0] // 2, groups=groups[0], bias=False)
        self.conv_2 = nn.Conv2d(c, c // 2, kernels[1], padding=kernels[1] // 2, groups=groups[1], bias=False)
        self.selfatten = AuthorsSelfAttention(c // 2)
        self.split = c // 2

    def forward(self, x):
        b = x.shape[0]
        x1, x2 = self.conv_1(x), self.conv_2(x)
        feats = torch.cat((x1, x2), 1).view(b, 2, self.split, x.shape[2], x.shape[3])
        x_msa = torch.cat((self.selfatten(x1), self.selfatten(x2)), 1)
        att = torch.softmax(x_msa.view(b, 2, self.split, x.shape[2], x.shape[3]), dim=1)
        fw = feats * att
        out = None
        for i in range(2):
            out = fw[:, i] if out is None else torch.cat((fw[:, i], out), 1)
        return out


def check_against_authors():
    torch.manual_seed(5)
    lit = AuthorsLayer2(128)
    lit.selfatten.gamma.data.fill_(0.6)
    gen = MFCSAM(128, residual="input", share=True, order="descending", grid="channels")
    gen.convs[0].weight.data.copy_(lit.conv_1.weight)
    gen.convs[1].weight.data.copy_(lit.conv_2.weight)
    gen.fca[0].load_state_dict(lit.selfatten.att_MSA.state_dict())
    for n in ("query", "key", "value"):
        getattr(gen.pam[0], n).load_state_dict(getattr(lit.selfatten, n).state_dict())
    gen.pam[0].alpha.data.copy_(lit.selfatten.gamma)
    x = torch.randn(1, 128, 14, 14)
    with torch.no_grad():
        a, b = lit(x), gen(x)
    err = (a - b).abs().max().item()
    assert err < 1e-5, err
    print(f"general MFCSAM = the authors' mfcsa_module_layer_2 (max |Δ| {err:.2e})")


def main():
    check_against_authors()
    out = {}
    g = torch.Generator().manual_seed(2024)
    x14 = torch.randn(2, 32, 14, 14, generator=g)
    x1012 = torch.randn(2, 32, 10, 12, generator=g)
    out["in.x14"], out["in.x1012"] = x14, x1012
    for dh, dw in ((14, 14), (10, 12), (7, 7), (5, 5)):
        out[f"dct.{dh}x{dw}"] = dct_filters(dh, dw)
    # FcaNet's own factor on a ≥7 grid is the same (the clamp only matters below 7).
    assert torch.equal(dct_filters(10, 12), dct_filters(10, 12, clamp=False))

    torch.manual_seed(1)
    with torch.no_grad():
        fca = FCA(32)
        out.update(fca.named("fca"))
        out["out.fca.1012"] = fca(x1012)
        fca.grid = (7, 7)
        out["out.fca.1012_fixed7"] = fca(x1012)

        fca64 = FCA(64, grid="channels")  # c2wh: 64 → a 56×56 grid, 7×9 pooled up to it
        out.update(fca64.named("fca64"))
        x64 = torch.randn(1, 64, 7, 9, generator=g)
        out["in.x64"] = x64
        out["out.fca64.channels"] = fca64(x64)

        pam = PAM(32)
        pam.alpha.data.fill_(0.7)
        out.update(pam.named("pam"))
        out["out.pam.14"] = pam(x14, x14)
        out["out.pam.1012"] = pam(x1012, x1012)

        pam8 = PAM(32, qk_red=8, slope=None)
        pam8.alpha.data.fill_(-0.4)
        out.update(pam8.named("pam8"))
        out["out.pam8.1012"] = pam8(x1012, x1012)

        variants = {
            "mfcsam_softmax": dict(),
            "mfcsam_concat": dict(fusion="concat", share=False, order="ascending"),
            "mfcsam_authors": dict(residual="input"),
        }
        for name, kw in variants.items():
            m = MFCSAM(32, **kw)
            set_alphas(m, [0.8, -0.5])
            out.update(m.named(name))
            out[f"out.{name}.14"] = m(x14)
            if name != "mfcsam_authors":
                out[f"out.{name}.1012"] = m(x1012)

        pf = PFAM(32, 64)
        set_alphas(pf, [0.5, 0.9])
        out.update(pf.named("pfam"))
        # X1 is in.x14; X2 passes through unchanged (not stored twice).
        i2 = torch.randn(2, 48, 7, 7, generator=g)
        i3 = torch.randn(2, 64, 7, 9, generator=g)
        o1, o2, o3 = pf(x14, i2, i3)
        assert o2 is i2
        out.update({"in.pfam2": i2, "in.pfam3": i3, "out.pfam.1": o1, "out.pfam.3": o3})

    out = {k: v.detach().float().clone().contiguous() for k, v in out.items()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(OUT))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB, {len(out)} tensors)")


if __name__ == "__main__":
    main()
