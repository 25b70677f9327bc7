#!/usr/bin/env python3
"""Python's torch.ao static quantization of the networks that benchmarks/quant.cpp quantizes
in C++. --model vgg16_bn (eager mode): the compressed VGG16-BN: the same architecture (VGG16-BN with 40% of every
convolution's filters removed — widths 39, 77, 154, 308 — and 10 classes), BatchNorm folded and
ReLU fused by torch.ao's fuse_modules, per-channel int8 weights, 7-bit activations
(reduce_range, as fasterai, so that oneDNN cannot saturate on CPUs without VNNI), min-max
observers, calibrated on the same number of random batches. --model resnet50 (FX graph mode):
torchvision's ResNet-50 with the same settings, residual additions in int8.

Prints one JSON object: medians in milliseconds at batch 1 on one thread, fp32 (folded) and
int8, timed interleaved (fp32, int8, fp32, ...), and the engine used.

    /usr/bin/python3 scripts/quant_baseline.py [--model vgg16_bn|resnet50] [--runs 15] [--engine onednn]
"""
import argparse
import json
import statistics
import time

import torch
import torch.ao.quantization as tq
from torchvision.models.vgg import VGG, make_layers

WIDTHS = [39, 39, "M", 77, 77, "M", 154, 154, 154, "M", 308, 308, 308, "M", 308, 308, 308, "M"]


class Quantized(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.quant, self.model, self.dequant = tq.QuantStub(), model, tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.model(self.quant(x)))


def compressed_vgg16_bn():
    torch.manual_seed(0)
    model = VGG(make_layers(WIDTHS, batch_norm=True), num_classes=10)
    model.classifier[0] = torch.nn.Linear(308 * 7 * 7, 4096)
    return trained_looking(model)


def fused(model):
    groups, layers = [], list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Conv2d):
            groups.append([f"features.{i}", f"features.{i + 1}", f"features.{i + 2}"])
    groups += [["classifier.0", "classifier.1"], ["classifier.3", "classifier.4"]]
    return tq.fuse_modules(model, groups)


QCONFIG = tq.QConfig(
    activation=tq.MinMaxObserver.with_args(quant_min=0, quant_max=127),  # 7 bits
    weight=tq.default_per_channel_weight_observer)


def trained_looking(model):
    with torch.no_grad():  # running statistics away from (0, 1), as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(n))
                m.bias.copy_(0.3 * torch.randn(n))
                m.running_mean.copy_(0.5 * torch.randn(n))
                m.running_var.copy_(0.5 + torch.rand(n))
    return model.eval()


def vgg_models(calibration_batches):
    fp32 = fused(compressed_vgg16_bn())  # BN folded into the convolutions: the C++ fp32 stage
    model = Quantized(fused(compressed_vgg16_bn()))
    model.qconfig = QCONFIG
    tq.prepare(model, inplace=True)
    with torch.no_grad():
        for _ in range(calibration_batches):
            model(torch.randn(1, 3, 224, 224))
    return fp32, tq.convert(model)


def resnet50_models(calibration_batches):
    """torchvision's ResNet-50 through torch.ao's FX graph mode (what Python users run on a model
    with residual additions): BN folded and ReLU fused by the FX passes, adds in int8."""
    from torch.ao.quantization import quantize_fx
    from torchvision.models import resnet50
    torch.manual_seed(0)
    example = (torch.randn(1, 3, 224, 224),)
    fp32 = quantize_fx.fuse_fx(trained_looking(resnet50()))  # BN folded: the fp32 stage
    torch.manual_seed(0)
    model = quantize_fx.prepare_fx(trained_looking(resnet50()), {"": QCONFIG}, example)
    with torch.no_grad():
        for _ in range(calibration_batches):
            model(torch.randn(1, 3, 224, 224))
    return fp32, quantize_fx.convert_fx(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--engine", default="onednn")
    parser.add_argument("--model", choices=["vgg16_bn", "resnet50"], default="vgg16_bn")
    parser.add_argument("--calibration-batches", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.backends.quantized.engine = args.engine
    build = vgg_models if args.model == "vgg16_bn" else resnet50_models
    fp32, int8 = build(args.calibration_batches)

    x = torch.randn(1, 3, 224, 224)
    times = {"fp32": [], "int8": []}
    with torch.inference_mode():
        for m in (fp32, int8):
            for _ in range(3):
                m(x)
        for _ in range(args.runs):
            for name, m in (("fp32", fp32), ("int8", int8)):
                start = time.perf_counter()
                m(x)
                times[name].append(1e3 * (time.perf_counter() - start))
    fp32_ms, int8_ms = statistics.median(times["fp32"]), statistics.median(times["int8"])
    print(json.dumps({"model": args.model, "engine": args.engine, "fp32_ms": fp32_ms, "int8_ms": int8_ms,
                      "speedup": fp32_ms / int8_ms, "runs": args.runs}))


if __name__ == "__main__":
    main()
