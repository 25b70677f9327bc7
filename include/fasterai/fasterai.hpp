#pragma once
// fasterai: make trained LibTorch networks smaller and faster. This header holds what most users
// need: models, the channel graph, sparsification, the transforms, training. The parts that pull
// LibTorch's JIT or c10d are opt-in, each with its own header:
//   <fasterai/deploy.hpp>    reloading pruned models, TorchScript export, inference optimization
//   <fasterai/quant.hpp>     int8: dynamic, static, traced, quantization-aware training
//   <fasterai/compress.hpp>  compress_for_deployment: prune, fold, optimize, int8, export in one call
//   <fasterai/dist.hpp>      data-parallel training over c10d
// Two more are opt-in because half of what this header would otherwise add to a translation
// unit's compile time is theirs (docs/building.md):
//   <fasterai/io/state_dict.hpp>        save and load PyTorch state_dict files (also in deploy.hpp)
//   <fasterai/data/fashion_mnist.hpp>   the Fashion-MNIST dataset of the examples

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/latency.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/core/statistics.hpp>
#include <fasterai/data/batches.hpp>
#include <fasterai/graph/autograd_ops.hpp>
#include <fasterai/graph/graph.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/graph/removal.hpp>
#include <fasterai/graph/sequential_graph.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/layers/sparsity_report.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/mobilenet_v2.hpp>
#include <fasterai/models/resnet.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/sparse/concepts.hpp>
#include <fasterai/sparse/criteria.hpp>
#include <fasterai/sparse/factory.hpp>
#include <fasterai/sparse/granularity.hpp>
#include <fasterai/sparse/lottery_ticket.hpp>
#include <fasterai/sparse/method.hpp>
#include <fasterai/sparse/schedule.hpp>
#include <fasterai/sparse/sensitivity.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/sparse/sparsifier_interface.hpp>
#include <fasterai/train/callback.hpp>
#include <fasterai/train/feature_distillation.hpp>
#include <fasterai/train/knowledge_distillation.hpp>
#include <fasterai/train/learner.hpp>
#include <fasterai/train/one_cycle.hpp>
#include <fasterai/train/optimizer.hpp>
#include <fasterai/train/regularizer.hpp>
#include <fasterai/train/reporter.hpp>
#include <fasterai/train/sparsify_callback.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/fc_decomposer.hpp>
#include <fasterai/transform/pruner.hpp>
