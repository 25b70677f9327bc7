// Module concepts: compile-time checks, positive and negative.
#include "catch.hpp"

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/sequential.hpp>

namespace nn = torch::nn;
using fasterai::module, fasterai::convolution, fasterai::linear_layer, fasterai::batch_norm,
    fasterai::prunable_layer, fasterai::sequential_like;

// Holders and implementations both count.
static_assert(module<nn::Conv2d> && module<nn::Conv2dImpl> && module<nn::Sequential>);
static_assert(!module<int> && !module<torch::Tensor> && !module<std::string>);

static_assert(convolution<nn::Conv2d> && convolution<nn::Conv2dImpl> && convolution<nn::Conv1d>);
static_assert(!convolution<nn::Linear> && !convolution<nn::BatchNorm2d> && !convolution<int>);

static_assert(linear_layer<nn::Linear> && linear_layer<nn::LinearImpl>);
static_assert(!linear_layer<nn::Conv2d> && !linear_layer<nn::Bilinear> && !linear_layer<int>);

static_assert(batch_norm<nn::BatchNorm2d> && batch_norm<nn::BatchNorm1dImpl>);
static_assert(!batch_norm<nn::LayerNorm> && !batch_norm<nn::Conv2d> && !batch_norm<double>);

static_assert(prunable_layer<nn::Conv2d> && prunable_layer<nn::Linear>);
static_assert(!prunable_layer<nn::BatchNorm2d> && !prunable_layer<nn::ReLU>);

static_assert(sequential_like<nn::Sequential> && sequential_like<nn::SequentialImpl>);
static_assert(sequential_like<const nn::Sequential&>);
static_assert(!sequential_like<nn::ModuleList> && !sequential_like<nn::Conv2d>);
static_assert(sequential_like<fasterai::NamedSequential>);
static_assert(!sequential_like<int> && !sequential_like<std::vector<nn::AnyModule>>);

// A user's own Sequential subclass is Sequential-like too.
struct MyNet : nn::SequentialImpl {};
static_assert(sequential_like<MyNet> && module<MyNet> && !convolution<MyNet>);

// The constraint is what a public function checks: it is false for a non-module, so passing
// one fails at the call with the concept's name rather than deep inside LibTorch.
template <class T>
constexpr bool takes_sequential = requires(const T& t) { fasterai::detail::impl(t); } &&
                                  sequential_like<T>;
static_assert(takes_sequential<nn::Sequential> && !takes_sequential<int>);

TEST_CASE("impl() reaches the same object through a holder and a reference", "[concepts]") {
  nn::Sequential seq(nn::Linear(2, 3));
  CHECK(&fasterai::detail::impl(seq) == seq.get());
  CHECK(&fasterai::detail::impl(*seq) == seq.get());
}
