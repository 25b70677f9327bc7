#pragma once
// IDX files: the format of MNIST and Fashion-MNIST (LeCun's "idx1-ubyte" / "idx3-ubyte").
// A 4-byte magic number (two zero bytes, an element-type code, a dimension count), one
// big-endian uint32 per dimension, then the values, big-endian, row-major. The files are
// usually distributed gzip-compressed; zlib's gzopen/gzread read both forms, so one reader
// serves both.
//
// The whole payload is read into one tensor at once: a 60000x28x28 uint8 file is 47 MB, and a
// dataset that keeps it in one tensor can serve any batch with a single index_select.
// Everything the header promises is checked against what the file holds; a missing,
// truncated, over-long or corrupt file raises data::file_error naming the file and the fault.
//
// A data file may come from anywhere. A header cannot make the reader allocate more than the
// file delivers: a plain file's size is compared with the header before any allocation, and a
// gzip stream is read in chunks, so a lying header costs no more than the bytes that follow
// it. A gzip bomb (a small file that inflates to gigabytes) is bounded by `max_bytes`: a
// header announcing more is refused before anything is read.

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>

namespace fasterai::data {

// A data file that cannot be used as it is. It is an argument_error: the path handed in names
// a file that does not hold what it must.
class file_error : public argument_error {
 public:
  file_error(std::string where, std::filesystem::path path, std::string_view problem)
      : argument_error(where + ": file '" + path.string() + "' " + std::string(problem)),
        path_(std::move(path)) {}
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

// The most bytes of values read_idx accepts by default (1 GiB; Fashion-MNIST's training
// images are 47 MB). Pass a larger max_bytes for larger trusted files.
inline constexpr std::int64_t idx_default_max_bytes = std::int64_t{1} << 30;

// Read an IDX file, plain or gzip-compressed, into one contiguous CPU tensor whose shape is
// the file's dimensions and whose dtype is the file's element type (uint8, int8, int16,
// int32, float32, float64). A file whose header announces more than `max_bytes` bytes of
// values is refused.
inline torch::Tensor read_idx(const std::filesystem::path& path,
                              std::int64_t max_bytes = idx_default_max_bytes);

// Write `values` (a CPU tensor of one of the IDX element types, 1 to 255 dimensions) as an
// IDX file, gzip-compressed when `gzip` is true. The counterpart of read_idx, for tools and
// tests.
inline void write_idx(const std::filesystem::path& path, const torch::Tensor& values,
                      bool gzip = false);

namespace detail {

// IDX element-type codes (third byte of the magic number).
inline const char* idx_type_name(int code) {
  switch (code) {
    case 0x08: return "uint8";
    case 0x09: return "int8";
    case 0x0B: return "int16";
    case 0x0C: return "int32";
    case 0x0D: return "float32";
    case 0x0E: return "float64";
    default: return nullptr;
  }
}

inline torch::ScalarType idx_dtype(int code) {
  switch (code) {
    case 0x08: return torch::kUInt8;
    case 0x09: return torch::kInt8;
    case 0x0B: return torch::kInt16;
    case 0x0C: return torch::kInt32;
    case 0x0D: return torch::kFloat32;
    default: return torch::kFloat64;
  }
}

inline int idx_code(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kUInt8: return 0x08;
    case torch::kChar: return 0x09;
    case torch::kShort: return 0x0B;
    case torch::kInt: return 0x0C;
    case torch::kFloat: return 0x0D;
    case torch::kDouble: return 0x0E;
    default: return 0;
  }
}

inline std::string shape_string(const std::vector<std::int64_t>& dims) {
  std::ostringstream os;
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? "x" : "") << dims[i];
  return os.str();
}

// IDX stores values big-endian; the hosts LibTorch runs on are little-endian.
inline void swap_bytes(std::uint8_t* data, std::int64_t count, size_t width) {
  if (width == 1) return;
  for (std::int64_t i = 0; i < count; ++i) std::reverse(data + i * width, data + (i + 1) * width);
}

// A gzFile that closes itself; zlib reads plain files through the same calls ("transparent").
struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

class IdxReader {
 public:
  IdxReader(std::filesystem::path path, std::int64_t max_bytes)
      : path_(std::move(path)), max_bytes_(max_bytes) {}

  torch::Tensor read() {
    open();
    std::uint8_t magic[4];
    const std::int64_t got = read_bytes(magic, 4);
    if (got < 4)
      fail(got == 0 ? "is empty: an IDX file starts with a 4-byte magic number"
                    : "is too short for an IDX header: " + std::to_string(got) +
                          " bytes where the magic number needs 4");
    if (magic[0] != 0 || magic[1] != 0) fail("is not an IDX file: magic number " + hex(magic) +
                                             " does not start with two zero bytes");
    const int code = magic[2];
    const char* type = idx_type_name(code);
    if (!type)
      fail("has an unknown element type code " + hex_byte(code) + " in its magic number " +
           hex(magic) +
           "; expected 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32 or 0x0E "
           "float64");
    const int rank = magic[3];
    if (rank == 0) fail("declares 0 dimensions in its magic number " + hex(magic) +
                        "; expected at least 1");

    std::vector<std::int64_t> dims(static_cast<size_t>(rank));
    for (int d = 0; d < rank; ++d) {
      std::uint8_t b[4];
      if (read_bytes(b, 4) < 4)
        fail("is truncated inside its header: it declares " + std::to_string(rank) +
             " dimensions but ends before the size of dimension " + std::to_string(d));
      dims[static_cast<size_t>(d)] = (std::int64_t(b[0]) << 24) | (std::int64_t(b[1]) << 16) |
                                     (std::int64_t(b[2]) << 8) | std::int64_t(b[3]);
    }

    const auto dtype = idx_dtype(code);
    const auto width = static_cast<std::int64_t>(c10::elementSize(dtype));
    // A corrupt or hostile header can announce absurd sizes; refuse before allocating.
    std::int64_t count = 1;
    for (auto n : dims) {
      if (n != 0 && count > max_bytes_ / width / n)
        fail("announces " + shape_string(dims) + " " + type + " values, more than max_bytes = " +
             std::to_string(max_bytes_) +
             " bytes (pass a larger max_bytes to read_idx if the file is trusted)");
      count *= n;
    }
    check_plain_size(count, width, dims, type, 4 + 4 * std::int64_t{rank});

    torch::Tensor values = read_payload(dtype, count, dims, type);
    expect_end(count, dims, type);
    swap_bytes(static_cast<std::uint8_t*>(values.data_ptr()), count, static_cast<size_t>(width));
    return values.reshape(dims);
  }

 private:
  std::filesystem::path path_;
  std::int64_t max_bytes_;
  GzFile file_;

  // An uncompressed file's size says at once whether the values the header announces are
  // there; only a gzip stream has to be read to know.
  void check_plain_size(std::int64_t count, std::int64_t width,
                        const std::vector<std::int64_t>& dims, const char* type,
                        std::int64_t header) {
    if (!gzdirect(file_.get())) return;
    std::error_code ec;
    const auto size = std::filesystem::file_size(path_, ec);
    if (ec) return;  // not a regular file (a pipe): reading finds out
    const auto payload = static_cast<std::int64_t>(size) - header;
    if (payload < count * width)
      fail("is truncated: its header announces " + shape_string(dims) + " " + type +
           " values (" + std::to_string(count * width) + " bytes) but only " +
           std::to_string(payload) + " bytes follow the header");
    if (payload > count * width)
      fail("is longer than its header says: " + std::to_string(payload - count * width) +
           " bytes follow the " + shape_string(dims) + " " + type + " values (" +
           std::to_string(count) + " values)");
  }

  [[noreturn]] void fail(const std::string& problem) const {
    throw file_error("fasterai::data::read_idx", path_, problem);
  }

  void open() {
    std::error_code ec;
    if (!std::filesystem::exists(path_, ec)) fail("does not exist");
    if (std::filesystem::is_directory(path_, ec)) fail("is a directory, not an IDX file");
    file_.reset(gzopen(path_.c_str(), "rb"));
    if (!file_) fail(std::string("cannot be opened: ") + std::strerror(errno));
    gzbuffer(file_.get(), 1 << 20);  // large reads from a 47 MB stream
  }

  // Read up to n bytes; a decompression fault is an error, a short read is reported by count.
  std::int64_t read_bytes(void* out, std::int64_t n) {
    auto* p = static_cast<char*>(out);
    std::int64_t done = 0;
    while (done < n) {
      const auto want = static_cast<unsigned>(std::min<std::int64_t>(n - done, INT_MAX / 2));
      const int got = gzread(file_.get(), p + done, want);
      if (got < 0) stream_fault();
      if (got == 0) break;
      done += got;
    }
    // A stream cut short reads short with Z_BUF_ERROR: the caller reports it as truncation.
    int err = Z_OK;
    gzerror(file_.get(), &err);
    if (err != Z_OK && err != Z_BUF_ERROR) stream_fault();
    return done;
  }

  [[noreturn]] void stream_fault() const {
    int err = Z_OK;
    const char* msg = gzerror(file_.get(), &err);
    if (err == Z_ERRNO) fail(std::string("cannot be read: ") + std::strerror(errno));
    fail(std::string("is not a valid gzip stream: ") + (msg ? msg : "zlib error"));
  }

  torch::Tensor read_payload(torch::ScalarType dtype, std::int64_t count,
                             const std::vector<std::int64_t>& dims, const char* type) {
    // Chunks keep a lying header from committing a huge allocation: memory grows with the
    // bytes the stream really holds. A real file of up to 64 MiB fits in one.
    const std::int64_t width = static_cast<std::int64_t>(c10::elementSize(dtype));
    const std::int64_t chunk_elems = std::max<std::int64_t>(1, (std::int64_t(1) << 26) / width);
    std::vector<torch::Tensor> chunks;
    std::int64_t done = 0;
    do {
      const std::int64_t n = std::min(chunk_elems, count - done);
      torch::Tensor chunk = torch::empty({n}, torch::TensorOptions().dtype(dtype));
      const std::int64_t got = read_bytes(chunk.data_ptr(), n * width);
      if (got < n * width)
        fail("is truncated: its header announces " + shape_string(dims) + " " + type +
             " values (" + std::to_string(count * width) + " bytes) but only " +
             std::to_string(done * width + got) + " bytes follow the header");
      chunks.push_back(std::move(chunk));
      done += n;
    } while (done < count);
    return chunks.size() == 1 ? chunks.front() : torch::cat(chunks);
  }

  // Reading one byte past the payload makes zlib check the gzip trailer (CRC, length) too.
  void expect_end(std::int64_t count, const std::vector<std::int64_t>& dims, const char* type) {
    char extra[4096];
    std::int64_t trailing = 0;
    for (;;) {
      const int got = gzread(file_.get(), extra, sizeof extra);
      if (got < 0) stream_fault();
      if (got == 0) break;
      trailing += got;
    }
    int err = Z_OK;
    gzerror(file_.get(), &err);
    if (err == Z_BUF_ERROR)
      fail("is truncated: its compressed stream ends before the gzip trailer");
    if (err != Z_OK) stream_fault();
    if (trailing > 0)
      fail("is longer than its header says: " + std::to_string(trailing) +
           " bytes follow the " + shape_string(dims) + " " + type + " values (" +
           std::to_string(count) + " values)");
  }

  static std::string hex_byte(int b) {
    static const char* digits = "0123456789ABCDEF";
    return std::string("0x") + digits[(b >> 4) & 15] + digits[b & 15];
  }
  static std::string hex(const std::uint8_t (&m)[4]) {
    std::string s = "0x";
    for (auto b : m) s += hex_byte(b).substr(2);
    return s;
  }
};

}  // namespace detail

inline torch::Tensor read_idx(const std::filesystem::path& path, std::int64_t max_bytes) {
  fasterai::detail::check_argument(max_bytes >= 0, "fasterai::data::read_idx", "max_bytes",
                                   max_bytes, "a number of bytes >= 0");
  return detail::IdxReader(path, max_bytes).read();
}

inline void write_idx(const std::filesystem::path& path, const torch::Tensor& values, bool gzip) {
  constexpr auto where = "fasterai::data::write_idx";
  fasterai::detail::check_argument(values.defined(), where, "values", "an undefined tensor",
                                   "a defined CPU tensor");
  const int code = detail::idx_code(values.scalar_type());
  fasterai::detail::check_argument(code != 0, where, "values.dtype", values.scalar_type(),
                                   "uint8, int8, int16, int32, float32 or float64");
  fasterai::detail::check_argument(values.dim() >= 1 && values.dim() <= 255, where,
                                   "values.dim()", values.dim(), "1 to 255 dimensions");
  for (auto n : values.sizes())
    fasterai::detail::check_argument(n <= 0xFFFFFFFFLL, where, "values.sizes()", values.sizes(),
                                     "dimensions that fit in 32 bits");
  detail::GzFile file(gzopen(path.c_str(), gzip ? "wb" : "wbT"));
  if (!file) throw file_error(where, path, std::string("cannot be created: ") + std::strerror(errno));
  std::vector<std::uint8_t> bytes{0, 0, static_cast<std::uint8_t>(code),
                                  static_cast<std::uint8_t>(values.dim())};
  for (auto n : values.sizes())
    for (int shift = 24; shift >= 0; shift -= 8)
      bytes.push_back(static_cast<std::uint8_t>((n >> shift) & 0xFF));
  const torch::Tensor data = values.to(torch::kCPU).contiguous().clone();
  detail::swap_bytes(static_cast<std::uint8_t*>(data.data_ptr()), data.numel(),
                     static_cast<size_t>(data.element_size()));
  const auto* payload = static_cast<const std::uint8_t*>(data.data_ptr());
  bytes.insert(bytes.end(), payload, payload + data.numel() * std::int64_t(data.element_size()));
  size_t done = 0;
  while (done < bytes.size()) {
    const auto n = static_cast<unsigned>(std::min<size_t>(bytes.size() - done, INT_MAX / 2));
    const int put = gzwrite(file.get(), bytes.data() + done, n);
    if (put <= 0) throw file_error(where, path, "cannot be written");
    done += static_cast<size_t>(put);
  }
  if (gzclose(file.release()) != Z_OK) throw file_error(where, path, "cannot be written");
}

}  // namespace fasterai::data
