#!/usr/bin/python3
"""Python baseline for fasterai's deployment benchmarks (benchmarks/deploy.cpp).

Times the same architectures in PyTorch on the same machine, batch 1, one thread: VGG16-BN
(10 classes, 3x224x224), the walkthrough's compact VGG (1x28x28) and ResNet-50 (1000 classes),
original and compressed, eager and torch.jit.trace + freeze + optimize_for_inference. The
compressed models have the shapes fasterai's Pruner + BNFolder give after Filter/Local/L1 at 40%
(every conv keeps n - floor(0.4 n) filters, BatchNorms folded into the convs): latency does not
depend on the values.

    scripts/python_baseline.py [--repetitions 5] [--cpp benchmarks.json] [--filter vgg16_bn]

With --cpp (Google Benchmark's JSON of `fasterai_benchmarks --benchmark_filter=Deploy`), the
table adds the C++ medians and the C++/Python ratio per row. Repetitions are interleaved over
the variants, so a busy machine slows them alike; medians over repetitions are reported.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torchvision

torch.set_num_threads(1)


def vgg_features(config, in_channels, batch_norm):
    layers = []
    for v in config:
        if v == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
        else:
            layers.append(torch.nn.Conv2d(in_channels, v, 3, padding=1))
            if batch_norm:
                layers.append(torch.nn.BatchNorm2d(v))
            layers.append(torch.nn.ReLU(inplace=True))
            in_channels = v
    return torch.nn.Sequential(*layers)


def kept(n, sparsity=40):
    return n - (n * sparsity) // 100


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_bn(compressed):
    if not compressed:
        return torchvision.models.vgg16_bn(num_classes=10)
    config = [v if v == "M" else kept(v) for v in VGG16]
    model = torchvision.models.vgg16_bn(num_classes=10)
    model.features = vgg_features(config, 3, batch_norm=False)
    model.classifier[0] = torch.nn.Linear(kept(512) * 49, 4096)
    return model


def compact_vgg(compressed):
    widths = [16, 32, 64]
    if compressed:
        widths = [kept(w) for w in widths]
    config = [widths[0], "M", widths[1], widths[1], "M", widths[2], widths[2], "M"]
    return torch.nn.Sequential(
        vgg_features(config, 1, batch_norm=not compressed),
        torch.nn.AdaptiveAvgPool2d((3, 3)),
        torch.nn.Flatten(),
        torch.nn.Sequential(torch.nn.Linear(widths[2] * 9, 256), torch.nn.ReLU(inplace=True),
                            torch.nn.Dropout(0.25), torch.nn.Linear(256, 10)))


def resnet50(compressed):
    assert not compressed
    return torchvision.models.resnet50(num_classes=1000)


NETWORKS = {
    "vgg16_bn": (vgg16_bn, (1, 3, 224, 224), [False, True]),
    "compact_vgg": (compact_vgg, (1, 1, 28, 28), [False, True]),
    "resnet50": (resnet50, (1, 3, 224, 224), [False]),
}


def variants(name):
    build, shape, models = NETWORKS[name]
    torch.manual_seed(0)
    x = torch.randn(shape)
    for compressed in models:
        model = build(compressed).eval()
        label = f"{name}_{'compressed' if compressed else 'original'}"
        yield f"{label}_eager", model, x
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
        yield f"{label}_traced", traced, x
        frozen = torch.jit.freeze(traced)
        yield f"{label}_frozen", frozen, x
        optimized = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))
        yield f"{label}_optimized", optimized, x


def time_once(fn, x, min_seconds):
    """Median wall and CPU seconds per call over calls filling min_seconds (at least 3). On a
    busy machine the process waits for a core: its CPU time is what the work itself costs."""
    wall, cpu = [], []
    start = time.perf_counter()
    while len(wall) < 3 or time.perf_counter() - start < min_seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(x)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.5, help="per variant and repetition")
    parser.add_argument("--filter", default="", help="only networks whose name contains this")
    parser.add_argument("--cpp", help="Google Benchmark JSON of the C++ Deploy benchmarks")
    parser.add_argument("--json", help="write the Python medians (ms) here")
    args = parser.parse_args()

    runs = []
    with torch.inference_mode():
        for name in NETWORKS:
            if args.filter in name:
                for label, fn, x in variants(name):
                    for _ in range(3):  # warm-up: oneDNN primitives, JIT profiling runs
                        fn(x)
                    runs.append((label, fn, x))
        wall = {label: [] for label, _, _ in runs}
        cpu = {label: [] for label, _, _ in runs}
        for _ in range(args.repetitions):
            for label, fn, x in runs:
                w, c = time_once(fn, x, args.min_seconds)
                wall[label].append(w)
                cpu[label].append(c)
    python_ms = {label: 1e3 * statistics.median(v) for label, v in wall.items()}
    python_cpu_ms = {label: 1e3 * statistics.median(v) for label, v in cpu.items()}

    cpp_ms, cpp_cpu_ms = {}, {}
    if args.cpp:
        with open(args.cpp) as f:
            for b in json.load(f)["benchmarks"]:
                if b.get("aggregate_name") == "median" and b["run_name"].startswith("Deploy_Latency/"):
                    scale = {"ms": 1.0, "us": 1e-3, "ns": 1e-6}[b["time_unit"]]
                    name = b["run_name"].split("/")[1]
                    cpp_ms[name] = b["real_time"] * scale
                    cpp_cpu_ms[name] = b["cpu_time"] * scale

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, batch 1, medians of "
          f"{args.repetitions} interleaved repetitions; wall and process CPU time (ms)")
    print("| variant | Python wall | Python CPU |" +
          (" C++ wall | C++ CPU | C++/Python (wall) | C++/Python (CPU) |" if cpp_ms else ""))
    print("|---|---:|---:|" + ("---:|---:|---:|---:|" if cpp_ms else ""))
    for label, ms in python_ms.items():
        row = f"| {label} | {ms:.3f} | {python_cpu_ms[label]:.3f} |"
        if cpp_ms:
            c, cc = cpp_ms.get(label), cpp_cpu_ms.get(label)
            row += (f" {c:.3f} | {cc:.3f} | {c / ms:.2f} | {cc / python_cpu_ms[label]:.2f} |"
                    if c else " – | – | – | – |")
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(python_ms, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
