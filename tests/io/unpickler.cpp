// The unpickler under hostile input: deep nesting, memo amplification, reference cycles,
// stride-0 views and the read limits. Every pickle is built here, opcode by opcode.

#include "catch.hpp"

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
