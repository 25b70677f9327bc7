// The unpickler under hostile input: deep nesting, memo amplification, reference cycles,
// stride-0 views and the read limits. Every pickle is built here, opcode by opcode.

#include <sys/resource.h>

#include "catch.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <fasterai/io/state_dict.hpp>
#include <fasterai/io/unpickler.hpp>

#include "io_testing.hpp"

using namespace io_testing;
using fasterai::ReadLimits;
using fasterai::StateDict;
namespace pickle = fasterai::detail::pickle;
using namespace std::string_literals;

namespace {

// Storage records the tests do not care about: zeros of the requested size.
const pickle::StorageLoader zeros = [](const std::string&, c10::ScalarType dtype,
                                       std::int64_t numel) {
  return torch::zeros({numel}, torch::TensorOptions().dtype(dtype));
};

// The unpickler's own message for `bytes`, or "(read)".
std::string unpickle_error(const std::string& bytes, const ReadLimits& limits = ReadLimits()) {
  try {
    pickle::unpickle(bytes, zeros, limits);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "(read)";
}

// The whole file, through the archive, with one storage "0" of `storage_floats` floats.
std::string file_error(const std::string& pkl, const ReadLimits& limits = ReadLimits(),
                       std::int64_t storage_floats = 1) {
  const std::string bytes =
      build_zip(torch_entries(pkl, {{"0", floats(torch::ones({storage_floats}))}})).bytes;
  return error_of([&] { read_bytes_as_state_dict(bytes, limits); });
}

// Seconds `f` takes.
template <class F>
double seconds(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// How many times longer `a` takes than `b`: the median over 3 rounds, the two alternating which
// runs first, so that both meet the same load. The memo tests below compare a file whose key is
// long with the same file whose key is one byte: when every use of a memoized key copied or
// hashed it, the long key made the file 20 to 1000 times slower; read once, it costs about what
// the short one does. A ratio tells the two apart on any machine, loaded or not, sanitized or
// not, where a bound in seconds does not.
template <class A, class B>
double time_ratio(A&& a, B&& b) {
  std::vector<double> ratios;
  for (int round = 0; round < 3; ++round) {
    double ta = 0, tb = 0;
    if (round % 2 == 0) {
      ta = seconds(a);
      tb = seconds(b);
    } else {
      tb = seconds(b);
      ta = seconds(a);
    }
    ratios.push_back(ta / std::max(tb, 1e-6));
  }
  std::sort(ratios.begin(), ratios.end());
  return ratios[1];
}

long peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024;
}

}  // namespace

TEST_CASE("deep nesting is refused by the depth limit, and freed flat when allowed",
          "[unpickler]") {
  // 135,000 nested 1-tuples in 135 KB: recursive destructors overflowed the stack on these.
  const std::string tuples = Pickle{}.raw({0x80, 2, 'N'}).repeat("\x85", 135000).raw({'.'}).bytes;
  CHECK_THAT(file_error(tuples),
             Catch::Contains("nesting depth of data.pkl's containers exceeds "
                             "ReadLimits::max_depth = 100") &&
                 Catch::Contains("fasterai::ReadLimits().max_depth(n)"));
  // Allowed all the way down: read, then refused as no dict, and freed without recursion.
  const auto unlimited = ReadLimits().max_depth(std::numeric_limits<std::int64_t>::max());
  CHECK_THAT(file_error(tuples, unlimited), Catch::Contains("no dict of tensors"));
  const pickle::Unpickled deep = pickle::unpickle(tuples, zeros, unlimited);
  CHECK(deep.objects.containers.size() == 135000);
  CHECK(deep.objects.at(std::get<pickle::Tuple>(deep.root).id).depth == 135000);

  // Lists nested by APPEND, dicts by SETITEM.
  const std::string lists =
      Pickle{}.raw({0x80, 2}).repeat("]", 100000).repeat("a", 99999).raw({'.'}).bytes;
  CHECK_THAT(unpickle_error(lists), Catch::Contains("ReadLimits::max_depth = 100"));
  CHECK(unpickle_error(lists, unlimited) == "(read)");
  CHECK(unpickle_error(lists, ReadLimits().max_depth(100000)) == "(read)");
  CHECK_THAT(unpickle_error(lists, ReadLimits().max_depth(99999)),
             Catch::Contains("max_depth = 99999"));
  Pickle dicts;
  dicts.raw({0x80, 2});
  for (int i = 0; i < 200; ++i) dicts.raw({'}'}).str("k");
  dicts.raw({'}'});
  dicts.repeat("s", 200).raw({'.'});
  CHECK_THAT(unpickle_error(dicts.bytes), Catch::Contains("max_depth = 100"));
  CHECK(unpickle_error(dicts.bytes, ReadLimits().max_depth(201)) == "(read)");
}

TEST_CASE("memoized values are shared, never copied", "[unpickler]") {
  // A 64 KiB string fetched 16,384 times: copies would take 1 GiB for a 100 KB pickle.
  Pickle q;
  q.raw({0x80, 2, ']', '('}).str(std::string(65536, 's')).raw({'q', 0});
  q.repeat(std::string("h\0", 2), 16383).raw({'e', '.'});
  const pickle::Unpickled shared = pickle::unpickle(q.bytes, zeros);
  const auto& items = shared.objects.at(std::get<pickle::List>(shared.root).id).items;
  REQUIRE(items.size() == 16384);
  bool same = true;
  for (const auto& item : items) {
    const auto s = std::get<pickle::Str>(item);
    same = same && s.pos == std::get<pickle::Str>(items.front()).pos && s.size == 65536;
  }
  CHECK(same);
  // The only copy of the string's bytes is the pickle itself.
  CHECK(shared.objects.bytes.size() == q.bytes.size());
  CHECK(shared.objects.str(std::get<pickle::Str>(items.back())) == std::string(65536, 's'));
}

TEST_CASE("reference cycles cannot be built", "[unpickler]") {
  // A list that contains itself: Python builds it; here it is refused.
  CHECK_THAT(unpickle_error("\x80\x02]q\x00h\x00" "a."s),
             Catch::Contains("a container is placed inside itself"));
  CHECK_THAT(unpickle_error(Pickle{}.raw({0x80, 2, '}', 'q', 0}).str("me").raw({'h', 0, 's', '.'}).bytes),
             Catch::Contains("a container is placed inside itself"));
  // A inside B, then B inside A: A is sealed once inside B.
  CHECK_THAT(unpickle_error("\x80\x02]q\x00]q\x01h\x00" "aa."s),
             Catch::Contains("APPEND changes a container that already lies inside another one"));
  // A memoized dict filled after it went into a tuple.
  CHECK_THAT(unpickle_error(Pickle{}
                                .raw({0x80, 2, '}', 'q', 0, 0x85, 'h', 0})
                                .str("k")
                                .raw({'N', 's', '.'})
                                .bytes),
             Catch::Contains("SETITEM changes a container that already lies inside another one"));
}

TEST_CASE("a dict's repeated key replaces its value in place", "[unpickler]") {
  const pickle::Unpickled u = pickle::unpickle(
      Pickle{}.raw({0x80, 2, '}', '('}).str("a").raw({'K', 1}).str("b").raw({'K', 2}).str("a")
          .raw({'K', 3, 'u', '.'}).bytes,
      zeros);
  const auto& items = u.objects.at(std::get<pickle::Dict>(u.root).id).items;
  REQUIRE(items.size() == 4);
  CHECK(u.objects.str(std::get<pickle::Str>(items[0])) == "a");
  CHECK(std::get<std::int64_t>(items[1]) == 3);
  CHECK(std::get<std::int64_t>(items[3]) == 2);
}

TEST_CASE("the entry and pickle-size limits name themselves", "[unpickler]") {
  const std::string nones = Pickle{}.raw({0x80, 2, '('}).repeat("N", 2000).raw({'t', '.'}).bytes;
  CHECK(unpickle_error(nones) == "(read)");
  CHECK_THAT(unpickle_error(nones, ReadLimits().max_entries(1000)),
             Catch::Contains("the values data.pkl holds at once exceeds ReadLimits::max_entries = "
                             "1000") &&
                 Catch::Contains("fasterai::ReadLimits().max_entries(n)"));
  // Marks count too: a pickle of nothing but MARKs.
  CHECK_THAT(unpickle_error(Pickle{}.repeat("(", 5000).bytes, ReadLimits().max_entries(1000)),
             Catch::Contains("max_entries = 1000"));
  const std::string one = tensor_pickle("w", 1, 0, {1}, {1});
  CHECK_THAT(file_error(nones, ReadLimits().max_pickle_bytes(100)),
             Catch::Contains("data.pkl's 2005 bytes exceeds ReadLimits::max_pickle_bytes = 100"));
  CHECK(file_error(one, ReadLimits().max_pickle_bytes(static_cast<std::int64_t>(one.size()))) ==
        "(no state_dict_error raised)");
}

TEST_CASE("views larger than their storage are refused above a cap unless allowed",
          "[unpickler]") {
  const std::int64_t huge = std::int64_t{1} << 62;
  const std::string repeat_huge = tensor_pickle("v", 1, 0, {huge}, {0});
  CHECK_THAT(file_error(repeat_huge),
             Catch::Contains("a tensor of 4611686018427387904 elements over a storage of 1") &&
                 Catch::Contains("ReadLimits::max_view_elements = 16777216"));
  // Asked for: the view is handed out as the file says (no memory behind its repeats).
  const std::string bytes = build_zip(torch_entries(repeat_huge, {{"0", floats(torch::full({1}, 2.0f))}})).bytes;
  const StateDict state = read_bytes_as_state_dict(
      bytes, ReadLimits().max_view_elements(std::numeric_limits<std::int64_t>::max()));
  CHECK(state["v"].sizes() == torch::IntArrayRef({huge}));
  CHECK(state["v"].strides() == torch::IntArrayRef({0}));
  CHECK(state["v"][huge - 1].item<float>() == 2.0f);
  // A small repeat (what torch.save writes for an expanded tensor) reads by default.
  const std::string small = build_zip(torch_entries(tensor_pickle("e", 1, 0, {3, 4}, {0, 0}),
                                                    {{"0", floats(torch::full({1}, 5.0f))}}))
                                .bytes;
  CHECK(torch::equal(read_bytes_as_state_dict(small)["e"], torch::full({3, 4}, 5.0f)));
  // Out-of-range views stay refused whatever the limits.
  CHECK_THAT(file_error(tensor_pickle("w", 4, 1, {2, 2}, {2, 1}), ReadLimits(), 4),
             Catch::Contains("reaches past the end of its storage of 4 elements"));
  CHECK_THAT(file_error(tensor_pickle("w", 4, 0, {2, huge}, {1, 2}), ReadLimits(), 4),
             Catch::Contains("reaches past the end"));
}

TEST_CASE("storages and parameters are checked where the pickle names them", "[unpickler]") {
  // Two persistent ids for storage "0" that disagree on its size.
  Pickle p;
  p.raw({0x80, 2, '('});
  for (int numel : {1, 2})
    p.raw({'('}).str("storage").global("torch", "FloatStorage").str("0").str("cpu")
        .raw({'K', numel, 't', 'Q'});
  p.raw({'t', '.'});
  CHECK_THAT(unpickle_error(p.bytes), Catch::Contains("storage 0 is read both as 1 Float and as 2 Float"));
  // An integer parameter that asks for gradients.
  Pickle param;
  param.raw({0x80, 2}).global("torch._utils", "_rebuild_parameter").raw({'('});
  param.global("torch._utils", "_rebuild_tensor_v2");
  param.raw({'(', '('}).str("storage").global("torch", "LongStorage").str("0").str("cpu");
  param.raw({'K', 1, 't', 'Q', 'K', 0, ')', ')', 0x89, '}', 't', 'R', 0x88, '}', 't', 'R', '.'});
  CHECK_THAT(unpickle_error(param.bytes), Catch::Contains("a parameter of dtype Long cannot require gradients"));
}

// ---------------------------------------------------------------------------------------------
// Memoized values cost their price once (issue 22): each file below took seconds to minutes,
// or gigabytes, before; each now ends with its value or a clean error naming the limit, in
// about the time of the same file with a short key (time_ratio).

TEST_CASE("a memoized key reused in 100,000 SETITEMs is hashed once", "[unpickler]") {
  // One 1 MiB key, then SETITEM with it (BINGET) 100,000 times: 23 s when every repeat hashed
  // and compared the whole key.
  const auto setitems = [](std::size_t key_bytes) {
    Pickle p;
    p.raw({0x80, 2, '}'}).str(std::string(key_bytes, 'k')).raw({'q', 0, 'K', 1, 's'});
    p.repeat(std::string("h\0K\x02s", 5), 99999).raw({'.'});
    return p.bytes;
  };
  const std::string long_key = setitems(1 << 20), short_key = setitems(1);
  pickle::Unpickled u;
  CHECK(time_ratio([&] { u = pickle::unpickle(long_key, zeros); },
                   [&] { pickle::unpickle(short_key, zeros); }) < 4.0);
  const auto& items = u.objects.at(std::get<pickle::Dict>(u.root).id).items;
  REQUIRE(items.size() == 2);
  CHECK(std::get<std::int64_t>(items[1]) == 2);
  // Equal keys in different places of the pickle are one key.
  const pickle::Unpickled twice = pickle::unpickle(
      Pickle{}.raw({0x80, 2, '}'}).str("a").raw({'K', 1, 's'}).str("a").raw({'K', 3, 's', '.'}).bytes,
      zeros);
  const auto& two = twice.objects.at(std::get<pickle::Dict>(twice.root).id).items;
  REQUIRE(two.size() == 2);
  CHECK(std::get<std::int64_t>(two[1]) == 3);
}

TEST_CASE("a memoized persistent id with a 65,000-byte key is resolved once", "[unpickler]") {
  const std::string key(65000, 'k');
  int loads = 0;
  const pickle::StorageLoader counting = [&](const std::string& k, c10::ScalarType dtype,
                                             std::int64_t numel) {
    ++loads;
    CHECK(k == key);
    return torch::zeros({numel}, torch::TensorOptions().dtype(dtype));
  };
  const pickle::StorageLoader any = [](const std::string&, c10::ScalarType dtype, std::int64_t numel) {
    return torch::zeros({numel}, torch::TensorOptions().dtype(dtype));
  };
  // The pid tuple memoized and fetched 6,000,000 times into one list: 22 s before the error
  // when each use copied and hashed the key. The list outgrows max_entries.
  const auto memoized = [](const std::string& k) {
    Pickle pid;
    pid.raw({0x80, 2, ']', '(', '('}).str("storage").global("torch", "FloatStorage").str(k);
    pid.str("cpu").raw({'K', 1, 't', 'q', 1, 'Q'});
    pid.repeat("h\x01Q", 5999999).raw({'e', '.'});
    return pid.bytes;
  };
  const std::string many = memoized(key), many_short = memoized("k");
  std::string error;
  const auto read = [&](const std::string& bytes, const pickle::StorageLoader& loader) {
    try {
      pickle::unpickle(bytes, loader);
    } catch (const std::runtime_error& e) {
      error = e.what();
    }
  };
  CHECK(time_ratio([&] { read(many, counting); }, [&] { read(many_short, any); }) < 4.0);
  CHECK_THAT(error, Catch::Contains("exceeds ReadLimits::max_entries = 8388608"));
  error.clear();
  loads = 0;
  read(many, counting);
  CHECK_THAT(error, Catch::Contains("exceeds ReadLimits::max_entries = 8388608"));
  CHECK(loads == 1);
  // Fresh pid tuples whose key is fetched from the memo: the key is interned, one storage.
  const auto interned = [](const std::string& k) {
    Pickle fresh;
    fresh.raw({0x80, 2, ']', '(', '('}).str("storage").raw({'q', 2});
    fresh.global("torch", "FloatStorage").raw({'q', 3}).str(k).raw({'q', 4});
    fresh.str("cpu").raw({'q', 5, 'K', 1, 't', 'Q'});
    fresh.repeat("(h\x02h\x03h\x04h\x05K\x01tQ", 199999).raw({'e', '.'});
    return fresh.bytes;
  };
  const std::string fresh = interned(key), fresh_short = interned("k");
  CHECK(time_ratio([&] { pickle::unpickle(fresh, any); }, [&] { pickle::unpickle(fresh_short, any); }) < 4.0);
  loads = 0;
  pickle::Unpickled u;
  u = pickle::unpickle(fresh, counting);
  const auto& storages = u.objects.at(std::get<pickle::List>(u.root).id).items;
  REQUIRE(storages.size() == 200000);
  CHECK(std::get<pickle::Storage>(storages.back()).id == std::get<pickle::Storage>(storages[0]).id);
  CHECK(loads == 1);
}

namespace {
// `count` one-element float tensors in a dict, all with one memoized size tuple of `dims` ones
// and one memoized stride tuple of `dims` zeros over storage "0".
std::string shared_dims_pickle(int count, int dims) {
  Pickle p;
  p.raw({0x80, 2, '}', '('});
  for (int i = 0; i < count; ++i) {
    p.str("t" + std::to_string(i));
    if (i == 0) {  // written in full and memoized: the global 4, pid 1, size 2, stride 3
      p.global("torch._utils", "_rebuild_tensor_v2").raw({'q', 4, '(', '('});
      p.str("storage").global("torch", "FloatStorage").str("0").str("cpu");
      p.raw({'K', 1, 't', 'q', 1, 'Q', 'K', 0, '('});
      p.repeat("K\x01", static_cast<std::size_t>(dims)).raw({'t', 'q', 2, '('});
      p.repeat("K\x00"s, static_cast<std::size_t>(dims)).raw({'t', 'q', 3});
      p.raw({0x89, 'N', 't', 'R'});
    } else {
      p.raw({'h', 4, '(', 'h', 1, 'Q', 'K', 0, 'h', 2, 'h', 3, 0x89, 'N', 't', 'R'});
    }
  }
  p.raw({'u', '.'});
  return p.bytes;
}
}  // namespace

TEST_CASE("sizes and strides shared through the memo are charged by their dimension count",
          "[unpickler]") {
  // 30,000 tensors of 4,096 dimensions: a 72 KB file took 2.1 GB and 5.3 s with a flat charge
  // per tensor (each TensorImpl holds 64 KB of sizes and strides).
  const std::string wide = shared_dims_pickle(30000, 4096);
  // Refused at the first tensor (the error is thrown there, before a second is read).
  std::string error = unpickle_error(wide);
  CHECK_THAT(error, Catch::Contains("a tensor's size of 4096 dimensions exceeds "
                                    "ReadLimits::max_dims = 64") &&
                        Catch::Contains("fasterai::ReadLimits().max_dims(n)"));
  // Allowed that many dimensions, they are charged against max_entries: refused after about
  // 2,000 tensors (128 MB), not 30,000.
  const long peak_before = peak_rss_mib();
  error = unpickle_error(wide, ReadLimits().max_dims(4096));
  CHECK_THAT(error, Catch::Contains("exceeds ReadLimits::max_entries = 8388608"));
#if !defined(__SANITIZE_ADDRESS__)  // AddressSanitizer's quarantine keeps freed memory
  CHECK(peak_rss_mib() - peak_before < 256);
#endif
  // 1,048,576 dimensions: refused before the first tensor is built.
  CHECK_THAT(unpickle_error(shared_dims_pickle(40, 1 << 20)),
             Catch::Contains("a tensor's size of 1048576 dimensions exceeds ReadLimits::max_dims"));
  // 64 dimensions read, as PyTorch's own tensors can have them.
  CHECK(unpickle_error(shared_dims_pickle(3, 64)) == "(read)");
  CHECK_THAT(unpickle_error(shared_dims_pickle(3, 65)), Catch::Contains("max_dims = 64"));
  CHECK(unpickle_error(shared_dims_pickle(3, 65), ReadLimits().max_dims(65)) == "(read)");
}
