#pragma once
// Test helpers for the io/ readers: temporary files, hand-made pickles and hand-made zip
// archives, so every hostile file a test needs is built by the test itself.

#include <zlib.h>

#include "catch.hpp"

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fasterai/io/state_dict.hpp>

namespace io_testing {

namespace fs = std::filesystem;

// A fresh directory under the system's temporary directory, removed with everything in it.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("fasterai-io-" + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  fs::path operator/(const std::string& name) const { return path / name; }
};

inline std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline void write_bytes(const fs::path& path, std::string_view bytes) {
  std::ofstream(path, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// The message of the state_dict_error that `f` raises; any other exception fails the test.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const fasterai::state_dict_error& e) {
    return e.what();
  }
  return "(no state_dict_error raised)";
}

// Pickle bytes written opcode by opcode (Python's Lib/pickletools.py documents each one).
struct Pickle {
  std::string bytes;
  Pickle& raw(std::initializer_list<int> codes) {
    for (int c : codes) bytes += static_cast<char>(c);
    return *this;
  }
  Pickle& text(std::string_view s) {
    bytes += s;
    return *this;
  }
  Pickle& repeat(std::string_view s, std::size_t n) {
    bytes.reserve(bytes.size() + s.size() * n);
    for (std::size_t i = 0; i < n; ++i) bytes += s;
    return *this;
  }
  Pickle& u32(std::uint32_t n) {
    return raw({int(n & 0xff), int((n >> 8) & 0xff), int((n >> 16) & 0xff), int(n >> 24)});
  }
  Pickle& str(std::string_view s) {  // BINUNICODE: 4-byte little-endian length, UTF-8
    raw({'X'}).u32(static_cast<std::uint32_t>(s.size()));
    return text(s);
  }
  Pickle& global(std::string_view module, std::string_view name) {
    return raw({'c'}).text(module).raw({'\n'}).text(name).raw({'\n'});
  }
  Pickle& integer(std::int64_t v) {  // LONG1 with 8 bytes
    raw({0x8a, 8});
    for (int i = 0; i < 8; ++i) bytes += static_cast<char>(static_cast<std::uint64_t>(v) >> (8 * i));
    return *this;
  }
};

// Python's pickle of a one-entry OrderedDict {'weight': 2x3 float tensor in storage '0'} in the
// opcodes torch.save uses (SETITEM, not SETITEMS), with `_metadata` set by BUILD and holding
// values that reach MEMOIZE, BINFLOAT, LONG1, BININT, BININT2 and LONG_BINPUT/LONG_BINGET.
inline std::string one_entry_pickle() {
  Pickle p;
  p.raw({0x80, 2}).global("collections", "OrderedDict").raw({'q', 0, ')', 'R', 'q', 1});
  p.raw({0x8c, 6}).text("weight");  // SHORT_BINUNICODE
  p.global("torch._utils", "_rebuild_tensor_v2").raw({'r', 2, 0, 0, 0});
  p.raw({'(', '('}).str("storage").global("torch", "FloatStorage").str("0").str("cpu");
  p.raw({'K', 6, 't', 'Q'});                                          // BINPERSID
  p.raw({'K', 0, 'K', 2, 'K', 3, 0x86, 'K', 3, 'K', 1, 0x86, 0x89});  // offset, size, stride
  p.raw({'h', 0, ')', 'R', 't', 'R', 's'});                           // hooks; SETITEM
  p.raw({'}', 0x94}).str("_metadata").raw({'h', 0, ')', 'R', '('}).str("").raw({'}', '('});
  p.str("version").raw({'K', 1});
  p.str("x").raw({'G', 0x3f, 0xf8, 0, 0, 0, 0, 0, 0});  // 1.5
  p.str("y").raw({0x8a, 2, 0x00, 0x80});                // -32768
  p.str("z").raw({'J', 0xff, 0xff, 0xff, 0xff});        // -1
  p.str("w").raw({'M', 0, 1});                          // 256
  p.str("v").raw({'j', 2, 0, 0, 0});
  p.raw({'u', 'u', 's', 'b', '.'});
  return p.bytes;
}

// One float32 tensor `name` of `size` with `stride` over storage "0" of `numel` elements, in
// an OrderedDict: the shape of everything torch.save writes, with every number chosen.
inline std::string tensor_pickle(std::string_view name, std::int64_t numel, std::int64_t offset,
                                 const std::vector<std::int64_t>& size,
                                 const std::vector<std::int64_t>& stride) {
  Pickle p;
  p.raw({0x80, 2}).global("collections", "OrderedDict").raw({')', 'R'});
  p.str(name).global("torch._utils", "_rebuild_tensor_v2");
  p.raw({'(', '('}).str("storage").global("torch", "FloatStorage").str("0").str("cpu");
  p.integer(numel).raw({'t', 'Q'});
  p.integer(offset).raw({'('});
  for (auto s : size) p.integer(s);
  p.raw({'t', '('});
  for (auto s : stride) p.integer(s);
  p.raw({'t', 0x89}).global("collections", "OrderedDict").raw({')', 'R', 't', 'R', 's', '.'});
  return p.bytes;
}

// Raw deflate (zip's method 8) of `data`.
inline std::string deflated_bytes(std::string_view data, int level = Z_BEST_COMPRESSION) {
  z_stream z{};
  REQUIRE(deflateInit2(&z, level, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY) == Z_OK);
  std::string out(deflateBound(&z, static_cast<uLong>(data.size())), '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  z.avail_in = static_cast<uInt>(data.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  REQUIRE(::deflate(&z, Z_FINISH) == Z_STREAM_END);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

inline std::uint32_t crc_of(std::string_view data) {
  return static_cast<std::uint32_t>(
      crc32(0L, reinterpret_cast<const Bytef*>(data.data()), static_cast<uInt>(data.size())));
}

struct ZipEntry {
  std::string name;
  std::string data;     // uncompressed
  bool deflated = false;
  std::string stored_as = {};  // when set: these bytes are written instead (a damaged stream)
};

// A zip archive of `entries` (ZIP64 end records when they are too many for the classic one), with the offsets a test needs to damage it.
struct Zip {
  std::string bytes;
  std::vector<std::size_t> header_offsets, data_offsets;
  std::size_t directory_offset = 0;
};

inline Zip build_zip(const std::vector<ZipEntry>& entries) {
  Zip zip;
  std::string directory;
  auto le = [](std::string& s, std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) s += static_cast<char>((v >> (8 * i)) & 0xff);
  };
  for (const auto& e : entries) {
    const std::string payload =
        !e.stored_as.empty() ? e.stored_as : (e.deflated ? deflated_bytes(e.data) : e.data);
    const std::uint16_t method = e.deflated ? 8 : 0;
    const std::uint32_t crc = crc_of(e.data);
    auto header = [&](std::string& s, bool central) {
      le(s, central ? 0x02014b50 : 0x04034b50, 4);
      if (central) le(s, 20, 2);  // version made by
      le(s, 20, 2);               // version needed
      le(s, 0, 2);                // flags
      le(s, method, 2);
      le(s, 0, 4);  // time, date
      le(s, crc, 4);
      le(s, payload.size(), 4);
      le(s, e.data.size(), 4);
      le(s, e.name.size(), 2);
      le(s, 0, 2);  // extra
      if (central) {
        le(s, 0, 2);  // comment
        le(s, 0, 2);  // disk
        le(s, 0, 2);  // internal attributes
        le(s, 0, 4);  // external attributes
        le(s, zip.bytes.size(), 4);
      }
      s += e.name;
    };
    header(directory, true);
    zip.header_offsets.push_back(zip.bytes.size());
    header(zip.bytes, false);
    zip.data_offsets.push_back(zip.bytes.size());
    zip.bytes += payload;
  }
  zip.directory_offset = zip.bytes.size();
  zip.bytes += directory;
  // Over 65,534 records the classic count overflows: ZIP64's end records carry it.
  const bool zip64 = entries.size() >= 0xFFFF;
  if (zip64) {
    const std::size_t record = zip.bytes.size();
    le(zip.bytes, 0x06064b50, 4);
    le(zip.bytes, 44, 8);        // size of the rest of this record
    le(zip.bytes, 45, 2);        // version made by
    le(zip.bytes, 45, 2);        // version needed
    le(zip.bytes, 0, 8);         // disks
    le(zip.bytes, entries.size(), 8);
    le(zip.bytes, entries.size(), 8);
    le(zip.bytes, directory.size(), 8);
    le(zip.bytes, zip.directory_offset, 8);
    le(zip.bytes, 0x07064b50, 4);  // locator
    le(zip.bytes, 0, 4);
    le(zip.bytes, record, 8);
    le(zip.bytes, 1, 4);
  }
  le(zip.bytes, 0x06054b50, 4);
  le(zip.bytes, 0, 4);  // disks
  le(zip.bytes, zip64 ? 0xFFFF : entries.size(), 2);
  le(zip.bytes, zip64 ? 0xFFFF : entries.size(), 2);
  le(zip.bytes, zip64 ? 0xFFFFFFFF : directory.size(), 4);
  le(zip.bytes, zip64 ? 0xFFFFFFFF : zip.directory_offset, 4);
  le(zip.bytes, 0, 2);  // comment
  return zip;
}

// The records of a torch.save archive: data.pkl, data/<key> for each storage, version.
inline std::vector<ZipEntry> torch_entries(
    std::string pickle, const std::vector<std::pair<std::string, std::string>>& storages,
    bool deflated = false) {
  std::vector<ZipEntry> entries{{"archive/data.pkl", std::move(pickle), deflated}};
  for (const auto& [key, bytes] : storages)
    entries.push_back({"archive/data/" + key, bytes, deflated});
  entries.push_back({"archive/version", "3\n", false});
  return entries;
}

inline std::string floats(const torch::Tensor& t) {
  const torch::Tensor c = t.contiguous().to(torch::kFloat);
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<std::size_t>(c.nbytes()));
}

// Reads a state_dict from memory, as a file would be read.
inline fasterai::StateDict read_bytes_as_state_dict(
    std::string_view bytes, const fasterai::ReadLimits& limits = fasterai::ReadLimits()) {
  return fasterai::detail::read_state_dict(
      "fasterai::read_state_dict", std::make_unique<fasterai::detail::MemorySource>(bytes),
      "<memory>", limits);
}

}  // namespace io_testing
