"""OpenVINO side of the feature-extraction benchmark (`cargo xtask bench`): ms/image of ResNet-18
layer1..3 (the weights file Tessera uses) and Wide-ResNet-50-2 layer1..3 (random weights, as in
torch_conv.py: speed does not depend on them) at 224 px, batch 1 and 8, with `--threads`
threads, once with f32 forced and once at OpenVINO's default precision (bf16 on CPUs with
native bf16, f32 elsewhere). Needs `openvino` and `numpy` only (no torch): the network is built
with OpenVINO's opset from the safetensors file, batch norm folded into the convolutions as
Tessera folds it.

Before timing, the ResNet-18 graph is checked against torchvision: run on the input of
crates/tessera-backbone/tests/golden/resnet18_real.safetensors, its layer1..3 outputs must
match the golden ones (max |error| / max |golden| <= 1e-4 in f32); the script stops otherwise.

    python3 tools/bench/openvino_backbone.py --weights ../shared/weights/resnet18-imagenet1k-l3.safetensors [--threads 2]
"""
import argparse
import json
import pathlib
import struct
import time

import numpy as np
import openvino as ov
import openvino.opset13 as ops

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "crates/tessera-backbone/tests/golden/resnet18_real.safetensors"
EPS = 1e-5

ap = argparse.ArgumentParser()
ap.add_argument("--weights", required=True, help="ResNet-18 safetensors, torchvision names")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--golden", default=str(GOLDEN))
args = ap.parse_args()


def read_safetensors(path):
    """name -> float32 array; a safetensors file is an 8-byte header length, JSON, raw data."""
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise SystemExit(f"{path}: tensor {name} is {meta['dtype']}, expected F32")
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(meta["shape"])
    return out


def random_weights(arch_blocks, width, rng):
    """torchvision-named Bottleneck weights (He init, identity batch norm) for Wide-ResNet-50-2."""
    w = {}

    def conv(name, cout, cin, k):
        w[name] = (rng.standard_normal((cout, cin, k, k)) * (2.0 / (cin * k * k)) ** 0.5).astype("f4")

    def bn(name, c):
        w[f"{name}.weight"] = np.ones(c, "f4")
        w[f"{name}.bias"] = np.zeros(c, "f4")
        w[f"{name}.running_mean"] = np.zeros(c, "f4")
        w[f"{name}.running_var"] = np.ones(c, "f4")

    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for li, (blocks, planes) in enumerate(zip(arch_blocks, (64, 128, 256)), start=1):
        mid, cout = planes * width // 64, planes * 4
        for bi in range(blocks):
            p = f"layer{li}.{bi}"
            conv(f"{p}.conv1.weight", mid, cin, 1)
            bn(f"{p}.bn1", mid)
            conv(f"{p}.conv2.weight", mid, mid, 3)
            bn(f"{p}.bn2", mid)
            conv(f"{p}.conv3.weight", cout, mid, 1)
            bn(f"{p}.bn3", cout)
            if bi == 0:
                conv(f"{p}.downsample.0.weight", cout, cin, 1)
                bn(f"{p}.downsample.1", cout)
            cin = cout
    return w


def build(weights, shape, bottleneck, blocks):
    """layer1..3 of a torchvision ResNet as an OpenVINO model with three outputs."""

    def conv_bn(x, conv, bn, stride, relu):
        wt = weights[conv]
        scale = weights[f"{bn}.weight"] / np.sqrt(weights[f"{bn}.running_var"] + EPS)
        bias = weights[f"{bn}.bias"] - weights[f"{bn}.running_mean"] * scale
        k = wt.shape[2]
        pad = [k // 2, k // 2]
        y = ops.convolution(x, ops.constant((wt * scale[:, None, None, None]).astype("f4")), [stride] * 2, pad, pad, [1, 1])
        y = ops.add(y, ops.constant(bias.reshape(1, -1, 1, 1).astype("f4")))
        return ops.relu(y) if relu else y

    x = ops.parameter(shape, np.float32, name="input")
    h = conv_bn(x, "conv1.weight", "bn1", 2, True)
    h = ops.max_pool(h, [2, 2], [1, 1], [1, 1], [1, 1], [3, 3]).output(0)
    outs = []
    for li, n in enumerate(blocks, start=1):
        for bi in range(n):
            p = f"layer{li}.{bi}"
            stride = 2 if (li > 1 and bi == 0) else 1
            if bottleneck:
                y = conv_bn(h, f"{p}.conv1.weight", f"{p}.bn1", 1, True)
                y = conv_bn(y, f"{p}.conv2.weight", f"{p}.bn2", stride, True)
                y = conv_bn(y, f"{p}.conv3.weight", f"{p}.bn3", 1, False)
            else:
                y = conv_bn(h, f"{p}.conv1.weight", f"{p}.bn1", stride, True)
                y = conv_bn(y, f"{p}.conv2.weight", f"{p}.bn2", 1, False)
            skip = h
            if f"{p}.downsample.0.weight" in weights:
                skip = conv_bn(h, f"{p}.downsample.0.weight", f"{p}.downsample.1", stride, False)
            h = ops.relu(ops.add(y, skip))
        outs.append(h)
    return ov.Model([ops.result(o) for o in outs], [x], "layers")


core = ov.Core()


def compile_model(model, precision):
    cfg = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision == "f32":
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    return core.compile_model(model, "CPU", cfg)


def run(compiled, x):
    r = compiled(x)
    return [r[o] for o in compiled.outputs]


r18 = read_safetensors(args.weights)
golden = read_safetensors(args.golden)
got = run(compile_model(build(r18, golden["input"].shape, False, (2, 2, 2)), "f32"), golden["input"])
for i, g in enumerate(got, start=1):
    ref = golden[f"layer{i}"]
    err = float(np.abs(g - ref).max() / np.abs(ref).max())
    if err > 1e-4:
        raise SystemExit(f"OpenVINO graph differs from torchvision at layer{i}: relative error {err:.2e}")
print("openvino_backbone: ResNet-18 graph matches torchvision's golden layer1..3 (f32)")

rng = np.random.default_rng(0)
arches = (
    ("resnet18", r18, False, (2, 2, 2)),
    ("wide_resnet50_2", random_weights((3, 4, 6), 128, rng), True, (3, 4, 6)),
)
for name, weights, bottleneck, blocks in arches:
    for b in (1, 8):
        x = rng.standard_normal((b, 3, 224, 224)).astype("f4")
        model = build(weights, x.shape, bottleneck, blocks)
        reference = None
        for precision in ("f32", "default"):
            compiled = compile_model(model, precision)
            actual = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
            outs = run(compiled, x)
            reps = max(10, 48 // b)
            for _ in range(2):
                run(compiled, x)
            t = time.perf_counter()
            for _ in range(reps):
                run(compiled, x)
            ms = (time.perf_counter() - t) / reps / b * 1e3
            if reference is None:
                reference = outs
                err = 0.0
            else:
                err = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outs, reference))
            print(
                f"| OpenVINO {ov.__version__.split('-')[0]} {name} layer1..3, batch{b} "
                f"({args.threads} threads, {precision}: {actual}, max rel. error vs f32 {err:.1e}) | {ms:.2f} ms/image |"
            )
