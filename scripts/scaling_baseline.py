#!/usr/bin/python3
"""Python eager side of the batch and thread scaling curves (benchmarks/scaling.cpp).

Times the same architectures as the C++ Scaling benchmarks in PyTorch eager, at the same
batches and thread counts, in the same order (model, threads, batch, variant):

  original     torchvision's VGG16-BN (10 classes), ResNet-50, MobileNetV2 (1000 classes) and
               VisionTransformer at ViT-Ti/16's shape (224, patches of 16, 12 layers of 3 heads,
               hidden 192, MLP 768), BatchNorm statistics as after training, eager
  pruned       the same modules rebuilt with the shapes of fasterai's pruned model, read from
               the JSON files the C++ benchmark writes (FASTERAI_SCALING_SHAPES): every Conv2d,
               BatchNorm2d and Linear whose weight shape differs is replaced by one of the new
               shape, and every state_dict shape is checked against the C++ model's; latency
               does not depend on the values
  pruned_int8  CNNs: torch.ao's FX graph mode (prepare_fx / convert_fx) on the pruned model,
               BatchNorms folded, oneDNN (the engine fasterai's traced int8 packs for), 7-bit
               activations and per-channel weights (quant_baseline.QCONFIG), min-max on 2
               random images. The ViT: torch.ao.quantization.quantize_dynamic on its Linears,
               per-channel weights, under QNNPACK (fasterai's default Linear engine);
               MultiheadAttention's own projections stay fp32 in both.

Each point: warm-up runs filling --warmup-seconds (at least one; none when the first run takes
over a second, which then counts as timed), then timed runs filling --min-seconds (at least
one); the median of the timed runs. Threads: torch.set_num_threads and
OpenBLAS's own pool (through its C API, since torch.set_num_threads does not size it).

    /usr/bin/python3 scripts/scaling_baseline.py --shapes DIR [--models vgg16_bn,resnet50]
        [--batches 1,8,32,64] [--threads 1,2] [--json out.json]
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_baseline import QCONFIG, trained_looking  # noqa: E402  (the int8 settings of the Quant benchmarks)

MODELS = ["vgg16_bn", "resnet50", "mobilenet_v2", "vit_ti_16"]
VARIANTS = ["original", "pruned", "pruned_int8"]


def build(name):
    torch.manual_seed(0)
    if name == "vgg16_bn":
        model = torchvision.models.vgg16_bn(num_classes=10)
    elif name == "resnet50":
        model = torchvision.models.resnet50(num_classes=1000)
    elif name == "mobilenet_v2":
        model = torchvision.models.mobilenet_v2(num_classes=1000)
    else:
        model = torchvision.models.vision_transformer.VisionTransformer(
            image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768,
            num_classes=1000)
    return trained_looking(model)


def resized(model, shapes):
    """The model with every Conv2d, BatchNorm2d and Linear rebuilt at the shape `shapes` gives
    its weight (a state_dict name -> shape map)."""
    for name, module in list(model.named_modules()):
        shape = shapes.get(f"{name}.weight")
        if shape is None or list(module.weight.shape) == shape:
            continue
        bias = getattr(module, "bias", None) is not None
        if isinstance(module, torch.nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            groups = shape[0] if depthwise else module.groups
            new = torch.nn.Conv2d(shape[1] * groups, shape[0], module.kernel_size, module.stride, module.padding,
                                  module.dilation, groups, bias)
        elif isinstance(module, torch.nn.BatchNorm2d):
            new = torch.nn.BatchNorm2d(shape[0], module.eps, module.momentum)
        elif isinstance(module, torch.nn.Linear):
            new = torch.nn.Linear(shape[1], shape[0], bias)
        else:
            raise SystemExit(f"scaling_baseline: cannot resize {name} ({type(module).__name__}) to {shape}")
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new)
    trained_looking(model)
    wrong = [(k, list(v.shape), shapes.get(k)) for k, v in model.state_dict().items()
             if shapes.get(k) is not None and list(v.shape) != shapes[k]]
    missing = [k for k in model.state_dict() if k not in shapes]
    if wrong or missing:
        raise SystemExit(f"scaling_baseline: pruned shapes differ from the C++ model's: {wrong[:5]} "
                         f"missing {missing[:5]}")
    return model.eval()


def int8(name, pruned):
    torch.manual_seed(1)
    calibration = [torch.randn(1, 3, 224, 224) for _ in range(2)]
    if name == "vit_ti_16":
        torch.backends.quantized.engine = "qnnpack"
        # Per-channel weights, as fasterai's quantize_dynamic by default.
        return torch.ao.quantization.quantize_dynamic(
            pruned, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})
    from torch.ao.quantization import quantize_fx
    torch.backends.quantized.engine = "onednn"
    prepared = quantize_fx.prepare_fx(pruned, torch.ao.quantization.QConfigMapping().set_global(QCONFIG),
                                      (calibration[0],))
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    return quantize_fx.convert_fx(prepared)


def blas_threads(n):
    """OpenBLAS's pool size, when OpenBLAS is loaded (Debian's torch runs some layers through it)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "openblas" in line.lower() and line.split()[-1].startswith("/")}
    for path in paths:
        lib = ctypes.CDLL(path)
        if hasattr(lib, "openblas_set_num_threads"):
            lib.openblas_set_num_threads(n)


LONG_RUN_SECONDS = 1.0


def time_point(fn, x, warmup_seconds, min_seconds):
    """As benchmarks/scaling.cpp: warm-up filling warmup_seconds (at least one run), except that
    a first run longer than LONG_RUN_SECONDS counts as the first timed run (at such sizes a
    first run at a new shape costs the same as the next within noise); then timed runs filling
    min_seconds (at least one)."""
    warmup, spent, ms = 0, 0.0, []
    while warmup < 1 or spent < warmup_seconds:
        start = time.perf_counter()
        fn(x)
        t = time.perf_counter() - start
        if warmup == 0 and t > LONG_RUN_SECONDS:
            ms.append(1e3 * t)
            break
        spent += t
        warmup += 1
    spent = ms[0] / 1e3 if ms else 0.0
    while not ms or spent < min_seconds:
        start = time.perf_counter()
        fn(x)
        ms.append(1e3 * (time.perf_counter() - start))
        spent += ms[-1] / 1e3
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs": len(ms),
            "warmup": warmup}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", required=True, help="folder of the C++ benchmark's <model>.json files")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--warmup-seconds", type=float, default=float(os.environ.get("FASTERAI_SCALING_WARMUP_SECONDS", 0.3)))
    parser.add_argument("--min-seconds", type=float, default=float(os.environ.get("FASTERAI_SCALING_MIN_SECONDS", 0.5)))
    parser.add_argument("--json", help="write the points here (default: stdout)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m}; one of {', '.join(MODELS)}")

    points = []
    torch.manual_seed(2)
    inputs = {b: torch.randn(b, 3, 224, 224) for b in batches}
    for name in models:
        with open(os.path.join(args.shapes, f"{name}.json")) as f:
            shapes = json.load(f)["shapes"]
        pruned = resized(build(name), shapes)
        run = {"original": build(name), "pruned": pruned}
        if "pruned_int8" in variants:
            run["pruned_int8"] = int8(name, resized(build(name), shapes))
        with torch.inference_mode():
            for t in threads:
                torch.set_num_threads(t)
                blas_threads(t)
                for b in batches:
                    for v in variants:
                        p = time_point(run[v], inputs[b], args.warmup_seconds, args.min_seconds)
                        points.append({"model": name, "variant": v, "batch": b, "threads": t, **p})
                        print(f"{name}/{v}/batch:{b}/threads:{t}: {p['median_ms']:.2f} ms", file=sys.stderr)
    text = json.dumps({"torch": torch.__version__, "points": points}, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
