#pragma once
// fasterai: make trained LibTorch networks smaller and faster. Include this one header.

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/latency.hpp>
#include <fasterai/core/layer_walk.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/core/state_dict.hpp>
#include <fasterai/core/statistics.hpp>
#include <fasterai/data/batches.hpp>
#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/data/idx.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/sparse/concepts.hpp>
#include <fasterai/sparse/criteria.hpp>
#include <fasterai/sparse/factory.hpp>
#include <fasterai/sparse/granularity.hpp>
#include <fasterai/sparse/method.hpp>
#include <fasterai/sparse/schedule.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/sparse/sparsifier_interface.hpp>
#include <fasterai/train/callback.hpp>
#include <fasterai/train/knowledge_distillation.hpp>
#include <fasterai/train/learner.hpp>
#include <fasterai/train/one_cycle.hpp>
#include <fasterai/train/sparsify_callback.hpp>
