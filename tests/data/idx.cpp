#include "catch.hpp"

#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/data/idx.hpp>

#include <sys/resource.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using fasterai::data::read_idx;
using fasterai::data::write_idx;

namespace {

// A fresh directory under the system temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("fasterai-idx-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

using Bytes = std::vector<std::uint8_t>;

void write_plain(const fs::path& p, const Bytes& bytes) {
  std::ofstream(p, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void write_gzip(const fs::path& p, const Bytes& bytes) {
  gzFile f = gzopen(p.c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!bytes.empty()) REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) > 0);
  gzclose(f);
}

void write_file(const fs::path& p, const Bytes& bytes, bool gzip) {
  gzip ? write_gzip(p, bytes) : write_plain(p, bytes);
}

Bytes read_raw(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

// Header of a uint8 IDX file with the given dimensions, then `payload` bytes 0, 1, 2, ...
Bytes idx_bytes(std::vector<std::uint32_t> dims, std::size_t payload, std::uint8_t type = 0x08) {
  Bytes b{0, 0, type, static_cast<std::uint8_t>(dims.size())};
  for (auto d : dims)
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<std::uint8_t>(d >> s));
  for (std::size_t i = 0; i < payload; ++i) b.push_back(static_cast<std::uint8_t>(i));
  return b;
}

}  // namespace

TEST_CASE("read_idx reads plain and gzip files into one tensor of their shape", "[idx]") {
  TempDir dir;
  const bool gzip = GENERATE(false, true);
  const auto path = dir / (gzip ? "a.gz" : "a");
  write_file(path, idx_bytes({2, 3, 4}, 24), gzip);
  const auto t = read_idx(path);
  CHECK(t.scalar_type() == torch::kUInt8);
  CHECK(t.sizes() == torch::IntArrayRef({2, 3, 4}));
  CHECK(t.is_contiguous());
  CHECK(torch::equal(t.flatten(), torch::arange(24, torch::kUInt8)));
}

TEST_CASE("read_idx decodes big-endian multi-byte element types", "[idx]") {
  TempDir dir;
  // int32 values 1 and -2, big-endian.
  Bytes b{0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFE};
  write_plain(dir / "i32", b);
  const auto t = read_idx(dir / "i32");
  REQUIRE(t.scalar_type() == torch::kInt);
  CHECK(t[0].item<int>() == 1);
  CHECK(t[1].item<int>() == -2);
}

TEST_CASE("write_idx and read_idx round-trip every element type", "[idx]") {
  TempDir dir;
  const bool gzip = GENERATE(false, true);
  for (auto dtype : {torch::kUInt8, torch::kInt8, torch::kInt16, torch::kInt32, torch::kFloat32,
                     torch::kFloat64}) {
    CAPTURE(dtype, gzip);
    const auto values = (torch::randn({3, 5, 2}) * 50).to(dtype);
    const auto path = dir / "rt";
    write_idx(path, values, gzip);
    const auto back = read_idx(path);
    CHECK(back.scalar_type() == dtype);
    CHECK(torch::equal(back, values));
    // Plain files are the documented byte layout: header then big-endian values.
    if (!gzip) CHECK(std::int64_t(read_raw(path).size()) == 4 + 3 * 4 + 30 * values.element_size());
  }
}

TEST_CASE("read_idx names the file and the fault of bad files", "[idx]") {
  TempDir dir;
  const bool gzip = GENERATE(false, true);
  CAPTURE(gzip);
  const auto path = dir / (gzip ? "bad.gz" : "bad");
  using Catch::Contains;

  SECTION("missing") {
    CHECK_THROWS_WITH(read_idx(dir / "nothing-here.gz"),
                      Contains("nothing-here.gz") && Contains("does not exist"));
  }
  SECTION("empty") {
    write_file(path, {}, gzip);
    CHECK_THROWS_WITH(read_idx(path), Contains(path.string()) && Contains("empty"));
  }
  SECTION("short header") {
    write_file(path, {0, 0}, gzip);
    CHECK_THROWS_WITH(read_idx(path), Contains(path.string()) && Contains("too short"));
  }
  SECTION("bad magic") {
    write_file(path, {0x12, 0x34, 0x08, 0x01, 0, 0, 0, 0}, gzip);
    CHECK_THROWS_WITH(read_idx(path), Contains("not an IDX file") && Contains("0x12340801"));
  }
  SECTION("unknown element type") {
    write_file(path, idx_bytes({1}, 1, 0x07), gzip);
    CHECK_THROWS_WITH(read_idx(path), Contains("unknown element type code 0x07"));
  }
  SECTION("zero dimensions") {
    write_file(path, {0, 0, 0x08, 0}, gzip);
    CHECK_THROWS_WITH(read_idx(path), Contains("0 dimensions"));
  }
  SECTION("truncated dimension sizes") {
    write_file(path, {0, 0, 0x08, 3, 0, 0, 0, 2, 0, 0}, gzip);
    CHECK_THROWS_WITH(read_idx(path),
                      Contains("truncated inside its header") && Contains("dimension 1"));
  }
  SECTION("truncated values") {
    write_file(path, idx_bytes({10, 28, 28}, 1000), gzip);
    CHECK_THROWS_WITH(read_idx(path), Contains(path.string()) && Contains("truncated") &&
                                          Contains("10x28x28 uint8") && Contains("7840 bytes") &&
                                          Contains("only 1000 bytes"));
  }
  SECTION("trailing bytes") {
    write_file(path, idx_bytes({4}, 6), gzip);
    CHECK_THROWS_WITH(read_idx(path), Contains("longer than its header says") &&
                                          Contains("2 bytes follow"));
  }
  SECTION("absurd size") {
    write_file(path, idx_bytes({0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF}, 16), gzip);
    CHECK_THROWS_WITH(read_idx(path), Contains("more than max_bytes"));
  }
  SECTION("every bad file is a file_error and an argument_error") {
    write_file(path, {1, 2, 3, 4, 5}, gzip);
    CHECK_THROWS_AS(read_idx(path), fasterai::data::file_error);
    CHECK_THROWS_AS(read_idx(path), fasterai::argument_error);
    try {
      read_idx(path);
    } catch (const fasterai::data::file_error& e) {
      CHECK(e.path() == path);
    }
  }
}

TEST_CASE("read_idx rejects damaged gzip streams", "[idx]") {
  TempDir dir;
  const auto good = dir / "good.gz";
  write_gzip(good, idx_bytes({64, 64}, 64 * 64));
  const Bytes bytes = read_raw(good);
  using Catch::Contains;

  SECTION("compressed stream cut short") {
    const auto cut = dir / "cut.gz";
    write_plain(cut, Bytes(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(bytes.size() / 2)));
    CHECK_THROWS_WITH(read_idx(cut), Contains("cut.gz") && Contains("truncated"));
  }
  SECTION("trailer cut off") {
    const auto cut = dir / "notrailer.gz";
    write_plain(cut, Bytes(bytes.begin(), bytes.end() - 8));
    CHECK_THROWS_WITH(read_idx(cut), Contains("notrailer.gz") && Contains("truncated"));
  }
  SECTION("corrupt checksum") {
    Bytes damaged = bytes;
    damaged[damaged.size() - 6] ^= 0xFF;  // inside the CRC-32 of the trailer
    const auto bad = dir / "crc.gz";
    write_plain(bad, damaged);
    CHECK_THROWS_WITH(read_idx(bad), Contains("crc.gz") && Contains("not a valid gzip stream"));
  }
  SECTION("corrupt deflate data") {
    Bytes damaged = bytes;
    for (std::size_t i = 12; i < 40 && i < damaged.size(); ++i) damaged[i] = 0xFF;
    const auto bad = dir / "deflate.gz";
    write_plain(bad, damaged);
    CHECK_THROWS_AS(read_idx(bad), fasterai::data::file_error);
  }
}

TEST_CASE("write_idx rejects tensors IDX cannot hold", "[idx]") {
  TempDir dir;
  using Catch::Contains;
  CHECK_THROWS_WITH(write_idx(dir / "x", torch::zeros({2}, torch::kLong)),
                    Contains("values.dtype") && Contains("uint8"));
  CHECK_THROWS_WITH(write_idx(dir / "x", torch::zeros({}, torch::kUInt8)),
                    Contains("values.dim()") && Contains("1 to 255"));
  CHECK_THROWS_WITH(write_idx(dir / "no-such-dir" / "x", torch::zeros({2}, torch::kUInt8)),
                    Contains("cannot be created"));
}

namespace {
long peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024;
}
}  // namespace

TEST_CASE("read_idx bounds memory by max_bytes and by the bytes the file really holds",
          "[idx]") {
  TempDir dir;
  using Catch::Contains;
  SECTION("a gzip bomb: 64 MiB of values in a small file") {
    const auto path = dir / "bomb.gz";
    Bytes bomb = idx_bytes({8192, 8192}, 0);
    bomb.resize(bomb.size() + (std::size_t{1} << 26), 0);
    write_gzip(path, bomb);
    REQUIRE(fs::file_size(path) < 200000);
    CHECK_THROWS_WITH(read_idx(path, 1 << 20),
                      Contains("bomb.gz") && Contains("8192x8192 uint8") &&
                          Contains("more than max_bytes = 1048576") &&
                          Contains("pass a larger max_bytes"));
    const auto t = read_idx(path);  // within the default of 1 GiB: the header is honest
    CHECK(t.sizes() == torch::IntArrayRef({8192, 8192}));
    CHECK(t.max().item<int>() == 0);
  }
  SECTION("headers that announce far more than follows") {
    const long before = peak_rss_mib();
    for (bool gzip : {false, true}) {
      CAPTURE(gzip);
      const auto path = dir / (gzip ? "liar.gz" : "liar");
      write_file(path, idx_bytes({16384, 65536}, 100), gzip);  // 1 GiB announced, 100 bytes
      CHECK_THROWS_WITH(read_idx(path), Contains("truncated") && Contains("1073741824 bytes") &&
                                            Contains("only 100 bytes follow"));
    }
    CHECK(peak_rss_mib() - before < 128);
  }
  SECTION("max_bytes must be a size") {
    write_plain(dir / "a", idx_bytes({2}, 2));
    CHECK_THROWS_AS(read_idx(dir / "a", -1), fasterai::argument_error);
    CHECK_THROWS_WITH(read_idx(dir / "a", 1), Contains("more than max_bytes = 1"));
    CHECK(read_idx(dir / "a", 2).numel() == 2);
  }
}
