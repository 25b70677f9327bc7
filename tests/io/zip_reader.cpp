// The zip archive under hostile input: every file is built here, then damaged on purpose.
// LibTorch's own reader (and Python's torch.load) loads the damaged ones as garbage; this one
// must refuse each with a message that says what is wrong.

#include "catch.hpp"

#include <cstdint>
#include <string>
#include <vector>

#include <fasterai/io/state_dict.hpp>
#include <fasterai/io/zip_reader.hpp>

#include "io_testing.hpp"

using namespace io_testing;
using fasterai::ReadLimits;
using fasterai::StateDict;

namespace {

const torch::Tensor weights = torch::arange(12, torch::kFloat).reshape({3, 4}) / 8;

// {"w": weights} as torch.save writes it, stored or deflated.
std::vector<ZipEntry> weight_entries(bool deflated) {
  return torch_entries(tensor_pickle("w", 12, 0, {3, 4}, {4, 1}), {{"0", floats(weights)}},
                       deflated);
}

std::string error_reading(const std::string& bytes, const ReadLimits& limits = ReadLimits()) {
  return error_of([&] { read_bytes_as_state_dict(bytes, limits); });
}

void put_u32(std::string& bytes, std::size_t at, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) bytes[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

}  // namespace

TEST_CASE("stored and deflated archives read to the same tensors", "[zip]") {
  for (bool deflated : {false, true}) {
    INFO("deflated " << deflated);
    const StateDict state = read_bytes_as_state_dict(build_zip(weight_entries(deflated)).bytes);
    REQUIRE(state.size() == 1);
    CHECK(torch::equal(state["w"], weights));
  }
}

TEST_CASE("a flipped bit in a stored record fails its CRC-32", "[zip]") {
  Zip zip = build_zip(weight_entries(false));
  zip.bytes[zip.data_offsets[1] + 5] ^= 0x10;  // inside data/0: one float changes
  CHECK_THAT(error_reading(zip.bytes),
             Catch::Contains("archive/data/0") && Catch::Contains("CRC-32"));
  Zip pkl = build_zip(weight_entries(false));
  pkl.bytes[pkl.data_offsets[0] + 20] ^= 0x01;  // inside data.pkl
  CHECK_THAT(error_reading(pkl.bytes),
             Catch::Contains("archive/data.pkl") && Catch::Contains("CRC-32"));
}

TEST_CASE("a record marked deflate with an invalid stream is refused", "[zip]") {
  auto entries = weight_entries(false);
  entries[1].deflated = true;
  entries[1].stored_as = std::string(48, '\xff');  // not deflate: block type 3 is reserved
  CHECK_THAT(error_reading(build_zip(entries).bytes),
             Catch::Contains("archive/data/0") && Catch::Contains("not a valid deflate stream"));

  // A valid stream of other bytes: the right size, the wrong content.
  entries[1].stored_as = deflated_bytes(std::string(48, '\0'));
  CHECK_THAT(error_reading(build_zip(entries).bytes), Catch::Contains("CRC-32"));

  // Valid streams of the wrong length, a cut stream, and bytes after the stream's end.
  entries[1].stored_as = deflated_bytes(std::string(44, '\0'));
  CHECK_THAT(error_reading(build_zip(entries).bytes), Catch::Contains("fewer than its declared 48"));
  entries[1].stored_as = deflated_bytes(std::string(52, '\0'));
  CHECK_THAT(error_reading(build_zip(entries).bytes), Catch::Contains("more than its declared 48"));
  const std::string good = deflated_bytes(floats(weights));
  entries[1].stored_as = good.substr(0, good.size() - 3);
  CHECK_THAT(error_reading(build_zip(entries).bytes), Catch::Contains("truncated"));
  entries[1].stored_as = good + "junk";
  CHECK_THAT(error_reading(build_zip(entries).bytes),
             Catch::Contains("bytes after the end of its deflate stream"));
}

TEST_CASE("local headers must agree with the central directory", "[zip]") {
  SECTION("an extra-field length off by 4 would shift a tensor by one float") {
    Zip zip = build_zip(weight_entries(false));
    zip.bytes[zip.header_offsets[1] + 28] = 4;
    CHECK_THAT(error_reading(zip.bytes), Catch::Contains("archive/data/0"));
  }
  SECTION("the same on the last record, which reaches into the directory") {
    auto entries = weight_entries(false);
    entries.pop_back();  // data/0 is now last
    Zip zip = build_zip(entries);
    zip.bytes[zip.header_offsets[1] + 28] = 4;
    CHECK_THAT(error_reading(zip.bytes), Catch::Contains("reaches past the start of the central"));
  }
  SECTION("another name, another method, another CRC") {
    Zip name = build_zip(weight_entries(false));
    name.bytes[name.header_offsets[1] + 30 + 8] = 'X';
    CHECK_THAT(error_reading(name.bytes), Catch::Contains("has a local header that names"));
    Zip method = build_zip(weight_entries(false));
    method.bytes[method.header_offsets[1] + 8] = 8;
    CHECK_THAT(error_reading(method.bytes), Catch::Contains("compression method differs"));
    Zip crc = build_zip(weight_entries(false));
    crc.bytes[crc.header_offsets[1] + 14] ^= 1;
    CHECK_THAT(error_reading(crc.bytes), Catch::Contains("CRC-32 or sizes differ"));
  }
  SECTION("records that overlap") {
    Zip zip = build_zip(weight_entries(false));
    // data.pkl's directory entry claims 8 more compressed (= stored) bytes than it has.
    const std::size_t entry = zip.directory_offset;
    const std::uint32_t size = static_cast<std::uint32_t>(zip.data_offsets[1] - 30 -
                                                          std::string("archive/data/0").size() -
                                                          zip.data_offsets[0] + 8);
    put_u32(zip.bytes, entry + 20, size);
    put_u32(zip.bytes, entry + 24, size);
    put_u32(zip.bytes, zip.header_offsets[0] + 18, size);
    put_u32(zip.bytes, zip.header_offsets[0] + 22, size);
    CHECK_THAT(error_reading(zip.bytes), Catch::Contains("overlaps record archive/data/0"));
  }
}

TEST_CASE("damaged directories, methods and flags are named", "[zip]") {
  const Zip good = build_zip(weight_entries(false));
  auto damaged = [&](std::size_t at, char value) {
    std::string bytes = good.bytes;
    bytes[at] = value;
    return error_reading(bytes);
  };
  const std::size_t eocd = good.bytes.size() - 22;
  CHECK_THAT(damaged(eocd + 12, 1), Catch::Contains("central directory's size and offset"));
  CHECK_THAT(damaged(eocd + 10, 100), Catch::Contains("several disks"));
  CHECK_THAT(damaged(eocd + 20, 1), Catch::Contains("no end of central directory"));
  CHECK_THAT(damaged(good.directory_offset + 10, 12), Catch::Contains("compression method 12"));
  CHECK_THAT(damaged(good.directory_offset + 8, 1), Catch::Contains("encrypted"));
  CHECK_THAT(damaged(good.directory_offset + 42, 1), Catch::Contains("archive/data.pkl"));

  auto twice = weight_entries(false);
  twice.push_back(twice[1]);
  CHECK_THAT(error_reading(build_zip(twice).bytes), Catch::Contains("appears twice"));
  // Every truncation of a valid archive is refused.
  for (std::size_t n = 0; n < good.bytes.size(); ++n) {
    INFO("first " << n << " bytes");
    CHECK_THAT(error_reading(good.bytes.substr(0, n)),
               Catch::Contains("fasterai::read_state_dict: cannot read <memory>"));
  }
}

TEST_CASE("a compressed record is read straight into its tensor, under the size cap", "[zip]") {
  // 16 MiB of floats that compress to about 16 KiB: a compression bomb in miniature.
  const std::int64_t numel = std::int64_t{1} << 22;
  const torch::Tensor big = torch::full({numel}, 0.25f);
  const std::string bytes =
      build_zip(torch_entries(tensor_pickle("big", numel, 0, {numel}, {1}), {{"0", floats(big)}},
                              /*deflated=*/true))
          .bytes;
  REQUIRE(bytes.size() < 100000);
  CHECK_THAT(error_reading(bytes, ReadLimits().max_tensor_bytes(1 << 20)),
             Catch::Contains("the tensors' bytes, with storage 0 of 4194304 elements of Float, "
                             "exceeds ReadLimits::max_tensor_bytes = 1048576") &&
                 Catch::Contains("fasterai::ReadLimits().max_tensor_bytes(n)"));
  const StateDict state = read_bytes_as_state_dict(bytes);
  CHECK(torch::equal(state["big"], big));
}

TEST_CASE("the version record is checked with a clear message", "[zip]") {
  auto entries = weight_entries(false);
  auto with_version = [&](std::string version) {
    entries.back().data = std::move(version);
    return error_reading(build_zip(entries).bytes);
  };
  CHECK_THAT(with_version("184467440737095516160000\n"),
             Catch::Contains("format version 184467440737095516160000") &&
                 Catch::Contains("reads versions 1 to 10"));
  CHECK_THAT(with_version("11\n"), Catch::Contains("format version 11"));
  CHECK_THAT(with_version("three\n"), Catch::Contains("'three', not a version number"));
  CHECK(with_version("10\n") == "(no state_dict_error raised)");
}

TEST_CASE("a file of 100,000 tensors reads in file order", "[zip][unpickler]") {
  // Every key and storage distinct, as torch.save writes a model with 100k parameters.
  const int n = 100000;
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::vector<std::string> keys;
  tensors.reserve(n);
  for (int i = 0; i < n; ++i) {
    tensors.emplace_back("layer" + std::to_string(i) + ".weight",
                         torch::full({1}, static_cast<float>(i)));
    keys.push_back(std::to_string(i));
  }
  std::vector<std::pair<std::string, std::string>> storages;
  storages.reserve(n);
  for (int i = 0; i < n; ++i) storages.emplace_back(keys[i], floats(tensors[i].second));
  const std::string bytes =
      build_zip(torch_entries(fasterai::detail::pickle::pickle_state_dict(tensors, keys), storages))
          .bytes;
  const StateDict state = read_bytes_as_state_dict(bytes);
  REQUIRE(state.size() == static_cast<std::size_t>(n));
  bool all = true;
  for (int i = 0; i < n; ++i) {
    const auto& item = state[static_cast<std::size_t>(i)];
    all = all && item.key() == tensors[i].first &&
          item.value().item<float>() == static_cast<float>(i);
  }
  CHECK(all);
}
