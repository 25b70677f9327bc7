#pragma once
// The one table of autograd node names that tracing understands, by family.
//
// Names differ between LibTorch versions and devices: a flatten is `ReshapeAliasBackward0` in
// 1.13 and `ViewBackward0` in 2.x, a batch norm `NativeBatchNormBackward0` on the CPU and
// `CudnnBatchNormBackward0` on CUDA. Nodes that touch a module's parameters are recognised by
// the module (a Conv2d's weight makes its node a convolution, whatever its name); this table
// names the parameter-free operations. A name missing here is a barrier: channels around it
// are kept, never guessed.

#include <array>
#include <string_view>

namespace fasterai::detail {

enum class OpFamily {
  ZeroPreserving,  // channel by channel and f(0) = 0: relu, pooling, dropout, clone, ...
  PerChannel,      // channel by channel but f(0) != 0 in general: sigmoid, softplus, + scalar
  Hardtanh,        // zero-preserving when min <= 0 <= max (ReLU6 is hardtanh(0, 6))
  View,            // view/reshape/flatten/squeeze: decided from the shapes
  Reduce,          // mean/sum: channel by channel when only dimensions after the channels go
  Add,             // add/sub of tensors
  Mul,             // mul of tensors
  Div,             // division: only by a constant
  Concat,
  Permute,         // transpose/permute: the channel dimension moves
  Select,          // select/slice along a dimension: channel by channel unless along channels
  Softmax,         // softmax/log_softmax: channel by channel unless over the channels
  Split,           // chunk/split: each piece a run of channels when cut along them
  BatchMatmul,     // bmm over a batch of heads: head h of both operands meet (q·kᵀ, attention·v)
  BatchNorm,       // recognised by its module's parameters; listed for affine-less batch norms
  Unknown,
};

struct OpName {
  std::string_view name;
  OpFamily family;
};

// Exact names (the trailing digit is the overload LibTorch generated).
inline constexpr std::array<OpName, 58> autograd_ops{{
    {"ReluBackward0", OpFamily::ZeroPreserving},
    {"ReluBackward1", OpFamily::ZeroPreserving},
    {"LeakyReluBackward0", OpFamily::ZeroPreserving},
    {"LeakyReluBackward1", OpFamily::ZeroPreserving},
    {"EluBackward0", OpFamily::ZeroPreserving},
    {"EluBackward1", OpFamily::ZeroPreserving},
    {"GeluBackward0", OpFamily::ZeroPreserving},
    {"SiluBackward0", OpFamily::ZeroPreserving},
    {"MishBackward0", OpFamily::ZeroPreserving},
    {"HardswishBackward0", OpFamily::ZeroPreserving},
    {"TanhBackward0", OpFamily::ZeroPreserving},
    {"MaxPool2DWithIndicesBackward0", OpFamily::ZeroPreserving},
    {"MkldnnMaxPool2DBackward0", OpFamily::ZeroPreserving},
    {"AvgPool2DBackward0", OpFamily::ZeroPreserving},
    {"AdaptiveAvgPool2DBackward0", OpFamily::ZeroPreserving},
    {"MkldnnAdaptiveAvgPool2DBackward0", OpFamily::ZeroPreserving},
    {"AdaptiveMaxPool2DBackward0", OpFamily::ZeroPreserving},
    {"UpsampleNearest2DBackward0", OpFamily::ZeroPreserving},
    {"UpsampleNearest2DBackward1", OpFamily::ZeroPreserving},
    {"UpsampleBilinear2DBackward0", OpFamily::ZeroPreserving},
    {"UpsampleBilinear2DBackward1", OpFamily::ZeroPreserving},
    {"CloneBackward0", OpFamily::ZeroPreserving},
    {"ToCopyBackward0", OpFamily::ZeroPreserving},
    {"NativeDropoutBackward0", OpFamily::ZeroPreserving},
    {"MulBackward1", OpFamily::ZeroPreserving},  // times a scalar
    {"DivBackward1", OpFamily::ZeroPreserving},  // by a scalar
    {"SigmoidBackward0", OpFamily::PerChannel},
    {"SoftplusBackward0", OpFamily::PerChannel},
    {"HardsigmoidBackward0", OpFamily::PerChannel},
    {"ExpBackward0", OpFamily::PerChannel},
    {"AddBackward1", OpFamily::PerChannel},   // plus a scalar
    {"SubBackward1", OpFamily::PerChannel},   // minus a scalar
    {"RsubBackward1", OpFamily::PerChannel},  // a scalar minus
    {"HardtanhBackward0", OpFamily::Hardtanh},
    {"ViewBackward0", OpFamily::View},
    {"ReshapeAliasBackward0", OpFamily::View},
    {"UnsafeViewBackward0", OpFamily::View},
    {"SqueezeBackward0", OpFamily::View},
    {"SqueezeBackward1", OpFamily::View},
    {"UnsqueezeBackward0", OpFamily::View},
    {"MeanBackward1", OpFamily::Reduce},
    {"SumBackward1", OpFamily::Reduce},
    {"AddBackward0", OpFamily::Add},
    {"SubBackward0", OpFamily::Add},
    {"MulBackward0", OpFamily::Mul},
    {"CatBackward0", OpFamily::Concat},
    {"TransposeBackward0", OpFamily::Permute},
    {"PermuteBackward0", OpFamily::Permute},
    {"SelectBackward0", OpFamily::Select},
    {"SliceBackward0", OpFamily::Select},
    {"SoftmaxBackward0", OpFamily::Softmax},
    {"LogSoftmaxBackward0", OpFamily::Softmax},
    {"GeluBackward1", OpFamily::ZeroPreserving},
    {"ExpandBackward0", OpFamily::ZeroPreserving},  // same rank: broadcast over other dims
    {"SplitBackward0", OpFamily::Split},
    {"SplitWithSizesBackward0", OpFamily::Split},
    {"UnsafeSplitBackward0", OpFamily::Split},
    {"BmmBackward0", OpFamily::BatchMatmul},
}};

inline OpFamily family_of(std::string_view name) {
  for (const auto& op : autograd_ops)
    if (op.name == name) return op.family;
  if (name == "DivBackward0") return OpFamily::Div;
  // Every batch-norm kernel (native, cuDNN, MIOpen, the no-training variant of 2.x).
  if (name.find("BatchNorm") != std::string_view::npos) return OpFamily::BatchNorm;
  return OpFamily::Unknown;
}

}  // namespace fasterai::detail
