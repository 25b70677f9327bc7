#include "catch.hpp"

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <caffe2/serialize/inline_container.h>

#include <fasterai/io/state_dict.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/vgg.hpp>

#include "io_testing.hpp"

namespace fs = std::filesystem;
namespace nn = torch::nn;
using namespace fasterai;
using namespace io_testing;

namespace {

using State = std::vector<std::pair<std::string, torch::Tensor>>;

// Every parameter and buffer, cloned: what "the model is unchanged" is compared against.
State snapshot(const nn::Module& model) {
  State s;
  for (const auto& p : model.named_parameters()) s.emplace_back(p.key(), p.value().clone());
  for (const auto& b : model.named_buffers()) s.emplace_back(b.key(), b.value().clone());
  return s;
}

// Bitwise: same names, dtypes, shapes and values.
bool same_state(const State& a, const State& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].first != b[i].first) return false;
    if (a[i].second.dtype() != b[i].second.dtype()) return false;
    if (!torch::equal(a[i].second, b[i].second)) return false;
  }
  return true;
}

// BatchNorm's running statistics away from their initial 0 / 1 / 0, so a round trip that
// dropped buffers would show.
void randomize_buffers(nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& b : model.named_buffers()) {
    if (b.key().ends_with("num_batches_tracked"))
      b.value().fill_(7);
    else
      b.value().uniform_(0.5, 1.5);
  }
}

// Raw little-endian float32 files: how tensors cross to and from Python in these tests.
torch::Tensor read_floats(const fs::path& path, std::vector<std::int64_t> shape) {
  const std::string bytes = read_bytes(path);
  torch::Tensor t = torch::empty(shape);
  REQUIRE(bytes.size() == static_cast<std::size_t>(t.nbytes()));
  std::memcpy(t.data_ptr<float>(), bytes.data(), bytes.size());
  return t;
}

void write_floats(const fs::path& path, const torch::Tensor& t) {
  const torch::Tensor c = t.contiguous().to(torch::kFloat);
  write_bytes(path, std::string_view(static_cast<const char*>(c.data_ptr()), c.nbytes()));
}

bool relatively_close(const torch::Tensor& actual, const torch::Tensor& expected,
                      double rtol = 1e-5) {
  return (actual - expected).abs().max().item<double>() <=
         rtol * expected.abs().max().item<double>();
}

// Writes a zip archive like torch.save's, with a hand-made data.pkl: to reach opcodes and
// damaged pickles that no writer at hand produces.
void write_archive(const fs::path& path, std::string_view pickle,
                   const std::vector<std::pair<std::string, std::string>>& records = {}) {
  caffe2::serialize::PyTorchStreamWriter writer(path.string());
  writer.writeRecord("data.pkl", pickle.data(), pickle.size());
  for (const auto& [name, bytes] : records) writer.writeRecord(name, bytes.data(), bytes.size());
  writer.writeEndOfFile();
}

std::string python() { return FASTERAI_PYTHON; }

// Runs a Python script with the directory as its argument.
void run_python(const TempDir& dir, const std::string& script) {
  write_bytes(dir / "script.py", script);
  const std::string cmd = python() + " " + (dir / "script.py").string() + " " + dir.path.string();
  REQUIRE(std::system(cmd.c_str()) == 0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Round trips and the unpickler, without Python.

TEST_CASE("save then load round-trips fasterai's models exactly", "[state_dict]") {
  TempDir dir;
  SECTION("compact_vgg") {
    torch::manual_seed(1);
    auto source = models::compact_vgg();
    randomize_buffers(*source);
    save_state_dict(source, dir / "compact.pt");
    torch::manual_seed(2);
    auto target = models::compact_vgg();
    REQUIRE_FALSE(same_state(snapshot(*source), snapshot(*target)));
    load_state_dict(target, dir / "compact.pt");
    CHECK(same_state(snapshot(*source), snapshot(*target)));
    CHECK(target->named_buffers()["features.1.num_batches_tracked"].item<std::int64_t>() == 7);

    // The file lists keys in Python's order: each module's parameters, then its buffers.
    const StateDict file = read_state_dict(dir / "compact.pt");
    const std::vector<std::string> first{"features.0.weight",
                                         "features.0.bias",
                                         "features.1.weight",
                                         "features.1.bias",
                                         "features.1.running_mean",
                                         "features.1.running_var",
                                         "features.1.num_batches_tracked"};
    REQUIRE(file.size() >= first.size());
    for (std::size_t i = 0; i < first.size(); ++i) CHECK(file.keys()[i] == first[i]);
  }
  SECTION("vgg11_bn") {
    torch::manual_seed(1);
    auto source = models::vgg11_bn(10);
    randomize_buffers(*source);
    save_state_dict(source, dir / "vgg.pt");
    torch::manual_seed(2);
    auto target = models::vgg11_bn(10);
    load_state_dict(target, dir / "vgg.pt");
    CHECK(same_state(snapshot(*source), snapshot(*target)));
  }
  CHECK_FALSE(fs::exists(dir / "compact.pt.partial"));
}

namespace {
// Parameters and buffers that share memory or are views: what save must write compactly while
// keeping the sharing that Python's torch.save keeps.
struct Views : nn::Module {
  torch::Tensor w, w_flat, transposed, row;
  Views() {
    w = register_parameter("w", torch::randn({2, 3}));
    w_flat = register_buffer("w_flat", w.detach().view({6}));
    transposed = register_buffer("transposed", torch::randn({4, 3}).t());
    row = register_buffer("row", torch::randn({100, 3})[7]);
  }
};
}  // namespace

TEST_CASE("save writes views compactly and keeps shared storages shared", "[state_dict]") {
  TempDir dir;
  Views source;
  save_state_dict(source, dir / "views.pt");
  const StateDict file = read_state_dict(dir / "views.pt");
  CHECK(file.keys() == std::vector<std::string>{"w", "w_flat", "transposed", "row"});
  CHECK(torch::equal(file["w"], source.w));
  CHECK(torch::equal(file["transposed"], source.transposed));
  CHECK(torch::equal(file["row"], source.row));
  CHECK(file["w_flat"].data_ptr() == file["w"].data_ptr());    // one storage, as in the model
  CHECK(file["row"].storage().nbytes() == 3 * sizeof(float));  // not the 100 x 3 buffer

  Views target;
  load_state_dict(target, dir / "views.pt");
  CHECK(same_state(snapshot(source), snapshot(target)));
  CHECK(target.w_flat.data_ptr() == target.w.data_ptr());  // the model's own sharing is kept
}

TEST_CASE("load keeps the model's dtype and converts only losslessly", "[state_dict]") {
  TempDir dir;
  nn::Linear single(3, 2);
  save_state_dict(single, dir / "float.pt");

  nn::Linear wide(3, 2);
  wide->to(torch::kDouble);
  load_state_dict(wide, dir / "float.pt");  // float32 -> float64 is exact
  CHECK(wide->weight.scalar_type() == torch::kDouble);
  CHECK(torch::equal(wide->weight.to(torch::kFloat), single->weight));
  CHECK(wide->weight.requires_grad());

  save_state_dict(wide, dir / "double.pt");
  nn::Linear narrow(3, 2);
  const State before = snapshot(*narrow);
  CHECK_THAT(error_of([&] { load_state_dict(narrow, dir / "double.pt"); }),
             Catch::Contains("dtype mismatch weight") && Catch::Contains("dtype mismatch bias") &&
                 Catch::Contains("Double"));
  CHECK(same_state(before, snapshot(*narrow)));
}

TEST_CASE("a state_dict that does not fit lists every offending key and changes nothing",
          "[state_dict]") {
  TempDir dir;
  SECTION("missing, unexpected and mis-shaped keys at once") {
    nn::Sequential file_model;
    file_model->push_back("a", nn::Linear(4, 2));
    file_model->push_back("c", nn::Linear(2, 2));
    save_state_dict(file_model, dir / "other.pt");

    nn::Sequential model;
    model->push_back("a", nn::Linear(3, 2));
    model->push_back("b", nn::Linear(2, 2));
    const State before = snapshot(*model);
    try {
      load_state_dict(model, dir / "other.pt");
      FAIL("no exception");
    } catch (const argument_error& e) {
      const std::string what = e.what();
      INFO(what);
      CHECK_THAT(what, Catch::Contains("fasterai::load_state_dict") &&
                           Catch::Contains((dir / "other.pt").string()) &&
                           Catch::Contains("missing key b.weight: model [2, 2]") &&
                           Catch::Contains("missing key b.bias: model [2]") &&
                           Catch::Contains("unexpected key c.weight: file [2, 2]") &&
                           Catch::Contains("unexpected key c.bias: file [2]") &&
                           Catch::Contains("shape mismatch a.weight: model [2, 3], file [2, 4]"));
      CHECK_THAT(what, !Catch::Contains("a.bias"));  // it fits
    }
    CHECK(same_state(before, snapshot(*model)));
  }
  SECTION("compact VGG without batch norm, and with other widths") {
    save_state_dict(models::compact_vgg(models::CompactVGGOptions().batch_norm(false)),
                    dir / "plain.pt");
    save_state_dict(models::compact_vgg(models::CompactVGGOptions().widths({8, 32, 64})),
                    dir / "narrow.pt");
    auto model = models::compact_vgg();
    const State before = snapshot(*model);
    CHECK_THAT(
        error_of([&] { load_state_dict(model, dir / "plain.pt"); }),
        Catch::Contains("missing key features.1.running_mean") &&
            Catch::Contains("missing key features.1.num_batches_tracked") &&
            Catch::Contains("unexpected key features.3.weight: file [32, 16, 3, 3]") &&
            Catch::Contains("shape mismatch features.5.weight: model [32], file [32, 32, 3, 3]"));
    CHECK_THAT(error_of([&] { load_state_dict(model, dir / "narrow.pt"); }),
               Catch::Contains("features.0.weight: model [16, 1, 3, 3], file [8, 1, 3, 3]") &&
                   Catch::Contains("features.1.running_var: model [16], file [8]") &&
                   Catch::Contains("features.4.weight: model [32, 16, 3, 3], file [32, 8, 3, 3]"));
    CHECK(same_state(before, snapshot(*model)));
  }
}

TEST_CASE("unreadable files raise an error naming the path and change nothing", "[state_dict]") {
  TempDir dir;
  auto model = models::compact_vgg();
  const State before = snapshot(*model);
  auto fails_with = [&](const fs::path& path, const std::string& problem) {
    INFO(path);
    CHECK_THAT(error_of([&] { load_state_dict(model, path); }),
               Catch::Contains("fasterai::load_state_dict") && Catch::Contains(path.string()) &&
                   Catch::Contains(problem));
  };
  fails_with(dir / "nonexistent.pt", "no such file");
  fails_with(dir.path, "not a regular file");

  write_bytes(dir / "text.pt", "this is not a zip archive\n");
  fails_with(dir / "text.pt", "not a zip archive");

  save_state_dict(model, dir / "whole.pt");
  const std::string whole = read_bytes(dir / "whole.pt");
  write_bytes(dir / "truncated.pt", std::string_view(whole).substr(0, whole.size() / 2));
  fails_with(dir / "truncated.pt", "truncated");
  write_bytes(dir / "empty.pt", "");
  fails_with(dir / "empty.pt", "not a zip archive");

  CHECK(same_state(before, snapshot(*model)));

  // A path whose directory does not exist cannot be written.
  CHECK_THAT(error_of([&] { save_state_dict(model, dir / "no" / "such" / "dir.pt"); }),
             Catch::Contains("fasterai::save_state_dict") && Catch::Contains("dir.pt"));
}

TEST_CASE("the unpickler reads torch::pickle_save's dicts: shared storages, offsets, strides",
          "[state_dict]") {
  TempDir dir;
  const auto w = torch::arange(6, torch::kFloat).reshape({2, 3});
  c10::Dict<std::string, at::Tensor> dict;
  dict.insert("w", w);
  dict.insert("transposed", w.t());  // same storage, other strides
  dict.insert("row", w[1]);          // same storage, offset 3
  dict.insert("count", torch::tensor(std::int64_t{5}));
  dict.insert("half", torch::ones({2}, torch::kHalf));
  dict.insert("mask", torch::tensor({true, false}));
  const auto bytes = torch::pickle_save(dict);
  write_bytes(dir / "dict.pt", std::string_view(bytes.data(), bytes.size()));

  const StateDict sd = read_state_dict(dir / "dict.pt");
  CHECK(sd.keys() == std::vector<std::string>{"w", "transposed", "row", "count", "half", "mask"});
  CHECK(torch::equal(sd["w"], w));
  CHECK(torch::equal(sd["transposed"], w.t()));
  CHECK(torch::equal(sd["row"], w[1]));
  CHECK(sd["count"].dim() == 0);
  CHECK(sd["count"].item<std::int64_t>() == 5);
  CHECK(sd["half"].scalar_type() == torch::kHalf);
  CHECK(torch::equal(sd["mask"], torch::tensor({true, false})));
  // One storage read once, shared as in the file.
  CHECK(sd["transposed"].data_ptr<float>() == sd["w"].data_ptr<float>());
  CHECK(sd["row"].data_ptr<float>() == sd["w"].data_ptr<float>() + 3);
}

TEST_CASE("the unpickler reads a one-entry OrderedDict (SETITEM) with metadata", "[state_dict]") {
  TempDir dir;
  const auto w = torch::arange(6, torch::kFloat).reshape({2, 3}) / 4;
  write_archive(dir / "single.pt", one_entry_pickle(),
                {{"data/0", std::string(static_cast<const char*>(w.data_ptr()), w.nbytes())}});
  nn::Linear linear(nn::LinearOptions(3, 2).bias(false));
  load_state_dict(linear, dir / "single.pt");
  CHECK(torch::equal(linear->weight, w));
}

TEST_CASE("the unpickler names what it does not support", "[state_dict]") {
  using namespace std::string_literals;
  TempDir dir;
  auto reads_with = [&](const std::string& name, const std::string& problem) {
    CHECK_THAT(error_of([&] { read_state_dict(dir / name); }),
               Catch::Contains(name) && Catch::Contains(problem));
  };

  c10::Dict<std::string, c10::List<std::int64_t>> ints;
  ints.insert("sizes", c10::List<std::int64_t>({1, 2}));
  auto bytes = torch::pickle_save(ints);
  write_bytes(dir / "ints.pt", std::string_view(bytes.data(), bytes.size()));
  reads_with("ints.pt", "unsupported global 'torch.jit._pickle.build_intlist'");

  c10::Dict<std::string, std::int64_t> counts;
  counts.insert("epochs", 3);
  bytes = torch::pickle_save(counts);
  write_bytes(dir / "counts.pt", std::string_view(bytes.data(), bytes.size()));
  reads_with("counts.pt", "entry 'epochs' is not a tensor");

  bytes = torch::pickle_save(torch::ones({2}));
  write_bytes(dir / "tensor.pt", std::string_view(bytes.data(), bytes.size()));
  reads_with("tensor.pt", "no dict of tensors");

  write_archive(dir / "pop.pt", "\x80\x02}N0."s);  // POP is not in a state_dict's subset
  reads_with("pop.pt", "unsupported pickle opcode 0x30 ('0') at byte 4");
  write_archive(dir / "os.pt", Pickle{}.raw({0x80, 2}).global("os", "system").raw({'.'}).bytes);
  reads_with("os.pt", "unsupported global 'os.system'");
  write_archive(dir / "cut.pt", Pickle{}.raw({0x80, 2, '}', 'X', 0xff, 0, 0, 0}).text("abc").bytes);
  reads_with("cut.pt", "truncated");
  write_archive(dir / "memo.pt", "\x80\x02h\x05."s);
  reads_with("memo.pt", "memo entry 5");
  // A storage record shorter than the tensor it backs.
  const std::string pickle = one_entry_pickle();
  write_archive(dir / "short.pt", pickle, {{"data/0", std::string(8, '\0')}});
  reads_with("short.pt", "record data/0 has 8 bytes, not 6 elements of Float");
  write_archive(dir / "nodata.pt", pickle);
  reads_with("nodata.pt", "no record data/0");
}

TEST_CASE("a damaged pickle raises state_dict_error, never anything worse", "[state_dict]") {
  TempDir dir;
  const auto w = torch::arange(6, torch::kFloat);
  const std::vector<std::pair<std::string, std::string>> records{
      {"data/0", std::string(static_cast<const char*>(w.data_ptr()), w.nbytes())}};
  const std::string good = one_entry_pickle();
  const fs::path path = dir / "damaged.pt";
  auto outcome = [&](const std::string& pickle) {
    write_archive(path, pickle, records);
    try {
      read_state_dict(path);
      return std::string("read");
    } catch (const state_dict_error&) {
      return std::string("state_dict_error");
    }
  };
  REQUIRE(outcome(good) == "read");
  // Every proper prefix lacks its STOP.
  for (std::size_t n = 0; n < good.size(); ++n) {
    INFO("prefix of " << n << " bytes");
    CHECK(outcome(good.substr(0, n)) == "state_dict_error");
  }
  // Random bytes in random places: read or refused, never a crash or another exception.
  std::mt19937 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    std::string bad = good;
    const int changes = 1 + trial % 3;
    for (int c = 0; c < changes; ++c)
      bad[std::uniform_int_distribution<std::size_t>(0, bad.size() - 1)(rng)] =
          static_cast<char>(std::uniform_int_distribution<int>(0, 255)(rng));
    INFO("trial " << trial);
    const std::string result = outcome(bad);
    CHECK((result == "read" || result == "state_dict_error"));
  }
}

// ---------------------------------------------------------------------------------------------
// Python as the oracle: files written by torch.save load here, files written here load there.

TEST_CASE("torchvision's vgg11_bn saved by Python loads and computes the same outputs",
          "[state_dict][python]") {
  if (python().empty()) {
    FASTERAI_SKIP("python3 with torchvision not found");
  }
  TempDir dir;
  run_python(dir, R"(
import sys, os, torch, torchvision
d = sys.argv[1]
torch.manual_seed(0)
m = torchvision.models.vgg11_bn(num_classes=10)
with torch.no_grad():                     # move the BatchNorm running statistics
    m.train(); m(torch.randn(4, 3, 32, 32))
m.eval()
torch.save(m.state_dict(), os.path.join(d, 'vgg.pt'))
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    y = m(x)
x.numpy().tofile(os.path.join(d, 'x.bin'))
y.numpy().tofile(os.path.join(d, 'y.bin'))
)");
  torch::manual_seed(5);
  auto model = models::vgg11_bn(10);
  load_state_dict(model, dir / "vgg.pt");
  CHECK(model->named_buffers()["features.1.num_batches_tracked"].item<std::int64_t>() == 1);
  model->eval();
  torch::NoGradGuard no_grad;
  const auto y = model->forward(read_floats(dir / "x.bin", {2, 3, 32, 32}));
  const auto expected = read_floats(dir / "y.bin", {2, 10});
  INFO("max difference " << (y - expected).abs().max().item<double>());
  CHECK(relatively_close(y, expected));
}

TEST_CASE("a one-entry state_dict saved by Python loads into a Linear", "[state_dict][python]") {
  if (python().empty()) {
    FASTERAI_SKIP("python3 with torchvision not found");
  }
  TempDir dir;
  run_python(dir, R"(
import sys, os, torch
d = sys.argv[1]
torch.manual_seed(0)
m = torch.nn.Linear(3, 2, bias=False)
torch.save(m.state_dict(), os.path.join(d, 'linear.pt'))
m.weight.detach().numpy().tofile(os.path.join(d, 'w.bin'))
)");
  nn::Linear linear(nn::LinearOptions(3, 2).bias(false));
  load_state_dict(linear, dir / "linear.pt");
  CHECK(torch::equal(linear->weight, read_floats(dir / "w.bin", {2, 3})));
}

TEST_CASE("a state_dict saved here loads in Python with the same values and outputs",
          "[state_dict][python]") {
  if (python().empty()) {
    FASTERAI_SKIP("python3 with torchvision not found");
  }
  TempDir dir;
  // The same network as the Python script's nn.Sequential, children named "0", "1", ...
  torch::manual_seed(3);
  nn::Sequential small(nn::Conv2d(3, 4, 3), nn::BatchNorm2d(4), nn::ReLU(), nn::Flatten(),
                       nn::Linear(4 * 6 * 6, 5));
  randomize_buffers(*small);
  small->eval();
  const auto x = torch::randn({2, 3, 8, 8});
  torch::Tensor y;
  {
    torch::NoGradGuard no_grad;
    y = small->forward(x);
  }
  write_floats(dir / "x.bin", x);
  save_state_dict(small, dir / "small.pt");
  auto compact = models::compact_vgg();
  randomize_buffers(*compact);
  save_state_dict(compact, dir / "compact.pt");

  run_python(dir, R"(
import collections, sys, os, numpy, torch
from torch import nn
d = sys.argv[1]
sd = torch.load(os.path.join(d, 'small.pt'), weights_only=True)  # PyTorch 2.6's default
assert type(sd) is collections.OrderedDict, type(sd)
assert list(sd.keys()) == ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean',
                           '1.running_var', '1.num_batches_tracked', '4.weight', '4.bias'], sd.keys()
m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5))
m.load_state_dict(sd)                     # strict: every key, every shape
m.eval()
x = torch.from_numpy(numpy.fromfile(os.path.join(d, 'x.bin'), dtype='float32'))
with torch.no_grad():
    m(x.reshape(2, 3, 8, 8)).numpy().tofile(os.path.join(d, 'y.bin'))
torch.save(m.state_dict(), os.path.join(d, 'small_back.pt'))
torch.save(torch.load(os.path.join(d, 'compact.pt'), weights_only=True),
           os.path.join(d, 'compact_back.pt'))
)");
  const auto python_y = read_floats(dir / "y.bin", {2, 5});
  INFO("max difference " << (python_y - y).abs().max().item<double>());
  CHECK(relatively_close(python_y, y));

  // Python's re-save carries exactly the values it read.
  nn::Sequential small_back(nn::Conv2d(3, 4, 3), nn::BatchNorm2d(4), nn::ReLU(), nn::Flatten(),
                            nn::Linear(4 * 6 * 6, 5));
  load_state_dict(small_back, dir / "small_back.pt");
  CHECK(same_state(snapshot(*small), snapshot(*small_back)));
  auto compact_back = models::compact_vgg();
  load_state_dict(compact_back, dir / "compact_back.pt");
  CHECK(same_state(snapshot(*compact), snapshot(*compact_back)));
}

// ---------------------------------------------------------------------------------------------
// Reading in two steps, and the read limits.

TEST_CASE("an already read state_dict loads with the same checks", "[state_dict]") {
  TempDir dir;
  torch::manual_seed(1);
  nn::Linear source(3, 2);
  save_state_dict(source, dir / "linear.pt");
  StateDict state = read_state_dict(dir / "linear.pt");
  nn::Linear target(3, 2);
  load_state_dict(target, state);
  CHECK(same_state(snapshot(*source), snapshot(*target)));

  state.insert("extra", torch::zeros({1}));
  nn::Linear other(3, 2);
  const State before = snapshot(*other);
  CHECK_THAT(error_of([&] { load_state_dict(other, state); }),
             Catch::Contains("the given state_dict does not fit the model") &&
                 Catch::Contains("unexpected key extra: file [1]"));
  CHECK(same_state(before, snapshot(*other)));
}

TEST_CASE("the read limits refuse large storages and views, naming the limit", "[state_dict]") {
  TempDir dir;
  nn::Linear source(3, 2);
  save_state_dict(source, dir / "linear.pt");
  CHECK_THAT(error_of([&] { read_state_dict(dir / "linear.pt", ReadLimits().max_tensor_bytes(30)); }),
             Catch::Contains("ReadLimits::max_tensor_bytes = 30") &&
                 Catch::Contains("ReadLimits().max_tensor_bytes(n)"));
  CHECK(read_state_dict(dir / "linear.pt", ReadLimits().max_tensor_bytes(32)).size() == 2);
}
