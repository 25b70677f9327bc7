// Files written by PyTorch itself: the fixtures in tests/data/files/ (written by PyTorch 1.13
// and 2.6 with make_io_fixtures.py there) and, when the build has a Python oracle, files that
// its torch.save writes now and files of ours that its torch.load reads back. Every value is
// asserted exactly.

#include "catch.hpp"

#include <complex>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <fasterai/io/state_dict.hpp>
#include <fasterai/io/unpickler.hpp>

#include "io_testing.hpp"

namespace fs = std::filesystem;
namespace nn = torch::nn;
using namespace io_testing;
using fasterai::ReadLimits;
using fasterai::StateDict;

namespace {

fs::path fixture(const std::string& name) { return fs::path(FASTERAI_TEST_DATA_DIR) / name; }

// Same dtype, shape and values (bitwise for the floating types: every value is exact).
bool same(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  if (a.numel() == 0) return true;
  return torch::equal(a.is_complex() ? torch::view_as_real(a.contiguous()) : a,
                      b.is_complex() ? torch::view_as_real(b.contiguous()) : b);
}

torch::Tensor complex_of(const std::vector<std::complex<double>>& values,
                         std::vector<std::int64_t> shape, c10::ScalarType dtype) {
  std::vector<double> re, im;
  for (const auto& v : values) {
    re.push_back(v.real());
    im.push_back(v.imag());
  }
  return torch::complex(torch::tensor(re, torch::kDouble), torch::tensor(im, torch::kDouble))
      .reshape(shape)
      .to(dtype);
}

// make_io_fixtures.py's matrix, built here: per dtype a 2x3 tensor, views of it, a 0-dim and a
// 0-element tensor.
const std::vector<std::pair<std::string, c10::ScalarType>> dtypes{
    {"float16", torch::kHalf},         {"float32", torch::kFloat},
    {"float64", torch::kDouble},       {"bfloat16", torch::kBFloat16},
    {"complex64", torch::kComplexFloat}, {"complex128", torch::kComplexDouble},
    {"bool", torch::kBool},            {"int8", torch::kChar},
    {"int16", torch::kShort},          {"int32", torch::kInt},
    {"int64", torch::kLong},           {"uint8", torch::kByte}};

template <class T>
torch::Tensor extremes(c10::ScalarType dtype) {
  constexpr T lo = std::numeric_limits<T>::min(), hi = std::numeric_limits<T>::max();
  return torch::tensor({std::int64_t{0}, std::int64_t{1}, std::int64_t{hi}, std::int64_t{lo},
                        std::int64_t{7}, std::int64_t{hi - 1}},
                       torch::kLong)
      .reshape({2, 3})
      .to(dtype);
}

torch::Tensor base(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kBool: return torch::tensor({true, false, true, false, false, true}).reshape({2, 3});
    case torch::kComplexFloat:
    case torch::kComplexDouble:
      return complex_of({{1, 2}, {-3.5, -0.25}, {0, 0}, {0, 1}, {-1, 0}, {2.5, 8}}, {2, 3}, dtype);
    case torch::kChar: return extremes<std::int8_t>(dtype);
    case torch::kShort: return extremes<std::int16_t>(dtype);
    case torch::kInt: return extremes<std::int32_t>(dtype);
    case torch::kLong: {  // beyond a double's 53 bits: no detour through floating point
      const std::int64_t lo = std::numeric_limits<std::int64_t>::min(),
                         hi = std::numeric_limits<std::int64_t>::max();
      return torch::tensor({std::int64_t{0}, std::int64_t{1}, hi, lo, std::int64_t{7}, hi - 1})
          .reshape({2, 3});
    }
    case torch::kByte: return extremes<std::uint8_t>(dtype);
    default:
      return torch::tensor({0.5, -1.25, 3.0, -2.0, 1024.0, 0.015625}, torch::kDouble)
          .reshape({2, 3})
          .to(dtype);
  }
}

std::vector<std::pair<std::string, torch::Tensor>> matrix() {
  std::vector<std::pair<std::string, torch::Tensor>> m;
  for (const auto& [name, dtype] : dtypes) {
    const torch::Tensor b = base(dtype);
    m.emplace_back(name, b);
    m.emplace_back(name + "_t", b.t());
    m.emplace_back(name + "_row", b[1]);
    m.emplace_back(name + "_step", b.slice(1, 0, 3, 2));
    m.emplace_back(name + "_expand", b.slice(0, 0, 1).expand({4, 3}));
    m.emplace_back(name + "_scalar", b[1][2].clone());
    m.emplace_back(name + "_empty", torch::zeros({0, 3}, torch::TensorOptions().dtype(dtype)));
  }
  return m;
}

// A file written by torch.save(matrix()) holds every value, and every view of it as Python
// wrote it: the same strides and offsets over one shared storage.
void check_matrix(const fs::path& path) {
  INFO(path);
  const StateDict sd = fasterai::read_state_dict(path);
  const auto expected = matrix();
  REQUIRE(sd.size() == expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const auto& [key, want] = expected[i];
    INFO(key);
    CHECK(sd.keys()[i] == key);
    CHECK(same(sd[key], want));
    CHECK_FALSE(sd[key].requires_grad());
  }
  for (const auto& [name, dtype] : dtypes) {
    INFO(name);
    const torch::Tensor& b = sd[name];
    CHECK(b.is_contiguous());
    for (const char* view : {"_t", "_row", "_step", "_expand"})
      CHECK(sd[name + view].storage().unsafeGetStorageImpl() ==
            b.storage().unsafeGetStorageImpl());
    CHECK(sd[name + "_t"].strides() == torch::IntArrayRef({1, 3}));
    CHECK(sd[name + "_row"].storage_offset() == 3);
    CHECK(sd[name + "_step"].strides() == torch::IntArrayRef({3, 2}));
    CHECK(sd[name + "_expand"].strides() == torch::IntArrayRef({0, 1}));
    CHECK(sd[name + "_scalar"].dim() == 0);
    CHECK(sd[name + "_empty"].sizes() == torch::IntArrayRef({0, 3}));
  }
}

// A module whose buffers are the matrix, in its order: what save_state_dict writes.
struct Matrix : nn::Module {
  Matrix() {
    for (const auto& [name, t] : matrix()) register_buffer(name, t);
  }
};

std::string python() { return FASTERAI_PYTHON; }

void run(const std::string& command) {
  INFO(command);
  REQUIRE(std::system(command.c_str()) == 0);
}

// Storage "0" of `numel` elements of `storage` (a torch.*Storage), viewed as tensor 'x' (whole,
// or of `size` elements with stride `stride`), with `metadata` writing the seventh argument of
// _rebuild_tensor_v2.
template <class Metadata>
std::string metadata_pickle(std::string_view storage, std::int64_t numel, Metadata metadata,
                            std::int64_t size = -1, std::int64_t stride = 1) {
  Pickle p;
  p.raw({0x80, 2}).global("collections", "OrderedDict").raw({')', 'R'});
  p.str("x").global("torch._utils", "_rebuild_tensor_v2");
  p.raw({'(', '('}).str("storage").global("torch", storage).str("0").str("cpu");
  p.integer(numel).raw({'t', 'Q'});
  p.integer(0).raw({'('}).integer(size < 0 ? numel : size).raw({'t', '('}).integer(stride);
  p.raw({'t', 0x89});
  p.global("collections", "OrderedDict").raw({')', 'R'});
  metadata(p);
  p.raw({'t', 'R', 's', '.'});
  return p.bytes;
}

// The bytes of `t` as storage "0".
std::string bytes_of(const torch::Tensor& t) {
  const torch::Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<std::size_t>(c.nbytes()));
}

StateDict read_pickle(const std::string& pkl, const torch::Tensor& storage,
                      const ReadLimits& limits = ReadLimits()) {
  return read_bytes_as_state_dict(build_zip(torch_entries(pkl, {{"0", bytes_of(storage)}})).bytes,
                                  limits);
}

std::string pickle_error(const std::string& pkl, const torch::Tensor& storage,
                         const ReadLimits& limits = ReadLimits()) {
  return error_of([&] { read_pickle(pkl, storage, limits); });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// PyTorch 2.x's tensor metadata: conjugate and negative views.

TEST_CASE("metadata 'conj': PyTorch 2.6's conjugate views load as their conjugated values",
          "[fixtures]") {
  const StateDict sd = fasterai::read_state_dict(fixture("torch26_conj.pt"));
  REQUIRE(sd.keys() == std::vector<std::string>{"plain", "conj", "conj_t"});
  // z = [1+2j, 3-4j]; torch.save({'plain': z, 'conj': z.conj(), ...}): one storage, two views.
  CHECK(same(sd["plain"], complex_of({{1, 2}, {3, -4}}, {2}, torch::kComplexFloat)));
  CHECK(same(sd["conj"], complex_of({{1, -2}, {3, 4}}, {2}, torch::kComplexFloat)));
  // w.conj().t() of a 2x3 complex128 w: conjugated and transposed.
  CHECK(same(sd["conj_t"], complex_of({{1, -2}, {5, 0}, {-3, -0.5}, {-6, 7}, {0, -4}, {8, -9}},
                                      {3, 2}, torch::kComplexDouble)));
  for (const auto& item : sd) CHECK_FALSE(item.value().is_conj());  // resolved, not a bit
  CHECK(sd["conj_t"].strides() == torch::IntArrayRef({1, 3}));      // the view Python wrote
  // The plain view still holds the file's bytes; the conjugate is a copy beside it.
  CHECK(sd["conj"].data_ptr() != sd["plain"].data_ptr());
}

TEST_CASE("metadata 'neg': PyTorch 2.6's negative views load as their negated values",
          "[fixtures]") {
  const StateDict sd = fasterai::read_state_dict(fixture("torch26_neg.pt"));
  REQUIRE(sd.keys() == std::vector<std::string>{"imag", "neg_int", "neg_uint8", "conj_neg"});
  // z.conj().imag of z = [1+2j, 3-4j] is [-2, 4], written as a float view with {'neg': True}.
  CHECK(same(sd["imag"], torch::tensor({-2.0f, 4.0f})));
  CHECK(same(sd["neg_int"], torch::tensor({-5, 7}, torch::kInt)));
  CHECK(same(sd["neg_uint8"], torch::tensor({255, 56}, torch::kByte)));  // wraps, as in 2.6
  // Both keys: -(conj(z)).
  CHECK(same(sd["conj_neg"], complex_of({{-1, 2}, {-3, -4}}, {2}, torch::kComplexFloat)));
  for (const auto& item : sd) CHECK_FALSE(item.value().is_neg());
}

namespace {
struct Phase : nn::Module {
  nn::Linear lin{nn::LinearOptions(2, 1).bias(false)};
  torch::Tensor phase;
  explicit Phase(torch::Tensor init = torch::zeros({2, 3}, torch::kComplexDouble)) {
    phase = register_buffer("phase", std::move(init));
    register_module("lin", lin);
  }
};
}  // namespace

TEST_CASE("metadata 'conj': a module whose buffer is a conjugate view loads its values",
          "[fixtures]") {
  Phase model;
  fasterai::load_state_dict(model, fixture("torch26_module_conj.pt"));
  CHECK(same(model.phase, complex_of({{1, -2}, {-3, -0.5}, {0, -4}, {5, 0}, {-6, 7}, {8, -9}},
                                     {2, 3}, torch::kComplexDouble)));
  CHECK(same(model.lin->weight.detach(), torch::tensor({{0.5f, -2.0f}})));

  // Saved here, the buffer is written as its values: read back, the same values.
  TempDir dir;
  Phase conjugated(model.phase.clone().conj());
  REQUIRE(conjugated.phase.is_conj());
  fasterai::save_state_dict(conjugated, dir / "phase.pt");
  CHECK(same(fasterai::read_state_dict(dir / "phase.pt")["phase"],
             model.phase.conj().resolve_conj()));
}

TEST_CASE("metadata that PyTorch does not write, or that this reader does not know, is refused",
          "[fixtures]") {
  const torch::Tensor z = complex_of({{1, 2}, {3, -4}}, {2}, torch::kComplexFloat);
  const torch::Tensor f = torch::tensor({2.0f, -4.0f});
  auto dict = [](std::vector<std::pair<std::string, char>> items) {  // values: NEWTRUE...
    return [items](Pickle& p) {
      p.raw({'}', '('});
      for (const auto& [key, value] : items) p.str(key).raw({value});
      p.raw({'u'});
    };
  };
  // None and an empty dict mean no flags, as in PyTorch.
  CHECK(same(read_pickle(metadata_pickle("FloatStorage", 2, [](Pickle& p) { p.raw({'N'}); }), f)["x"], f));
  CHECK(same(read_pickle(metadata_pickle("FloatStorage", 2, dict({})), f)["x"], f));
  CHECK(same(read_pickle(metadata_pickle("FloatStorage", 2, dict({{"neg", '\x88'}})), f)["x"], -f));
  CHECK(same(read_pickle(metadata_pickle("ComplexFloatStorage", 2, dict({{"conj", '\x88'}})), z)["x"],
             z.conj().resolve_conj()));
  // An unknown key: PyTorch 2.6 ignores it; here it is named and refused.
  CHECK_THAT(pickle_error(metadata_pickle("FloatStorage", 2, dict({{"neg", '\x88'}, {"zero", '\x88'}})), f),
             Catch::Contains("a tensor's metadata has the key 'zero', which this reader does not "
                             "know (it knows 'conj' and 'neg')"));
  // False: PyTorch 2.6 would conjugate anyway; ambiguous, so refused.
  CHECK_THAT(pickle_error(metadata_pickle("ComplexFloatStorage", 2, dict({{"conj", '\x89'}})), z),
             Catch::Contains("a tensor's metadata 'conj' is False; torch.save writes only True"));
  CHECK_THAT(pickle_error(metadata_pickle("FloatStorage", 2, dict({{"neg", 'N'}})), f),
             Catch::Contains("a tensor's metadata 'neg' is a None"));
  // Flags that no tensor of the dtype can carry.
  CHECK_THAT(pickle_error(metadata_pickle("FloatStorage", 2, dict({{"conj", '\x88'}})), f),
             Catch::Contains("metadata 'conj' is set on a tensor of dtype Float: only complex "
                             "tensors have conjugate views"));
  CHECK_THAT(pickle_error(metadata_pickle("BoolStorage", 2, dict({{"neg", '\x88'}})),
                          torch::tensor({true, false})),
             Catch::Contains("metadata 'neg' is set on a tensor of dtype Bool"));
  // Not a dict.
  CHECK_THAT(pickle_error(metadata_pickle("FloatStorage", 2, [](Pickle& p) { p.raw({'K', 5}); }), f),
             Catch::Contains("_rebuild_tensor_v2's metadata (its 7th argument) is a int"));
  // The resolved copy counts against max_tensor_bytes: 8 bytes of storage, 8 of copy.
  const std::string neg = metadata_pickle("FloatStorage", 2, dict({{"neg", '\x88'}}));
  CHECK(same(read_pickle(neg, f, ReadLimits().max_tensor_bytes(16))["x"], -f));
  CHECK_THAT(pickle_error(neg, f, ReadLimits().max_tensor_bytes(15)),
             Catch::Contains("a copy that resolves a conjugate or negative view of 2 elements of "
                             "Float") &&
                 Catch::Contains("ReadLimits::max_tensor_bytes = 15"));
  // The copy is of the storage, not of the view: a stride-0 view of a million elements over
  // one float costs 4 bytes more, and keeps its strides.
  const std::string repeated =
      metadata_pickle("FloatStorage", 1, dict({{"neg", '\x88'}}), 1 << 20, 0);
  const torch::Tensor x = read_pickle(repeated, torch::tensor({2.5f}), ReadLimits().max_tensor_bytes(8))["x"];
  CHECK(x.strides() == torch::IntArrayRef({0}));
  CHECK(same(x, torch::full({1 << 20}, -2.5f)));
}

// ---------------------------------------------------------------------------------------------
// The round-trip matrix: every dtype, 0-dim and 0-element tensors, views sharing a storage.

TEST_CASE("the matrix written by PyTorch 1.13 and by PyTorch 2.6 reads with identical values",
          "[fixtures]") {
  check_matrix(fixture("torch113_matrix.pt"));
  check_matrix(fixture("torch26_matrix.pt"));
}

TEST_CASE("the matrix saved here reads back here with the same values", "[fixtures]") {
  TempDir dir;
  fasterai::save_state_dict(Matrix(), dir / "matrix.pt");
  const StateDict sd = fasterai::read_state_dict(dir / "matrix.pt");
  const auto expected = matrix();
  REQUIRE(sd.size() == expected.size());
  for (const auto& [key, want] : expected) {
    INFO(key);
    CHECK(same(sd[key], want));
  }
}

TEST_CASE("the matrix round-trips through the Python oracle's torch.save and torch.load",
          "[fixtures][python]") {
  if (python().empty()) {
    FASTERAI_SKIP("python3 with torchvision not found");
  }
  TempDir dir;
  const std::string script = fixture("make_io_fixtures.py").string();
  // Python writes the matrix now (torch113_matrix.pt on Debian 12, torch26_* on Debian 13).
  run(python() + " " + script + " write " + dir.path.string());
  int read = 0;
  for (const auto& entry : fs::directory_iterator(dir.path))
    if (entry.path().filename().string().ends_with("_matrix.pt")) {
      check_matrix(entry.path());
      ++read;
    }
  CHECK(read == 1);
  // Python reads ours (weights_only=True where the version has it) and finds every value.
  fasterai::save_state_dict(Matrix(), dir / "ours.pt");
  run(python() + " " + script + " check " + (dir / "ours.pt").string());
}
