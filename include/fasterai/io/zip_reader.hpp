#pragma once
// The zip archive around a torch.save file, read with every size, offset and checksum checked.
//
// Why not LibTorch's `caffe2::serialize::PyTorchStreamReader` (miniz): it trusts what it reads.
// A record marked deflate whose stream is invalid comes back as uninitialized heap bytes, a
// local header whose extra-field length is off shifts a tensor's bytes, and a flipped bit in a
// stored record loads as is, because no CRC-32 is checked. Here the central directory is the
// one source of truth: every local header must agree with it (name, method, and where it sets
// them, CRC-32 and sizes), records may not overlap each other or the directory, a record
// decompresses to exactly its declared size with its compressed bytes used exactly, and its
// CRC-32 must match before its bytes are handed out.
//
// Supported: stored and deflate records, ZIP64 (files and records over 4 GiB), one disk, no
// encryption: what torch.save and Python's zipfile write.

#include <zlib.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace fasterai::detail {

// Where the archive's bytes come from: a file, or memory (tests and fuzzing).
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  virtual std::uint64_t size() const = 0;
  // Exactly n bytes at offset, or throws.
  virtual void read(std::uint64_t offset, void* out, std::size_t n) = 0;
};

class FileSource final : public ByteSource {
 public:
  explicit FileSource(const std::filesystem::path& path)
      : in_(path, std::ios::binary), size_(0) {
    if (!in_) throw std::runtime_error("the file cannot be opened");
    in_.seekg(0, std::ios::end);
    size_ = static_cast<std::uint64_t>(in_.tellg());
  }
  std::uint64_t size() const override { return size_; }
  void read(std::uint64_t offset, void* out, std::size_t n) override {
    if (offset > size_ || n > size_ - offset)
      throw std::runtime_error("read past the end of the file");
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(static_cast<char*>(out), static_cast<std::streamsize>(n));
    if (!in_) throw std::runtime_error("the file cannot be read (changed while reading?)");
  }

 private:
  std::ifstream in_;
  std::uint64_t size_;
};

class MemorySource final : public ByteSource {
 public:
  explicit MemorySource(std::string_view bytes) : bytes_(bytes) {}
  std::uint64_t size() const override { return bytes_.size(); }
  void read(std::uint64_t offset, void* out, std::size_t n) override {
    if (offset > bytes_.size() || n > bytes_.size() - offset)
      throw std::runtime_error("read past the end of the archive");
    if (n > 0) std::memcpy(out, bytes_.data() + offset, n);
  }

 private:
  std::string_view bytes_;
};

// One record, as the central directory describes it and its local header confirms.
struct ZipRecord {
  std::string name;
  std::uint16_t method = 0;  // 0 stored, 8 deflate
  std::uint32_t crc32 = 0;
  std::uint64_t compressed_size = 0;
  std::uint64_t size = 0;  // once decompressed
  std::uint64_t header_offset = 0;
  std::uint64_t data_offset = 0;
};

class ZipReader {
 public:
  explicit ZipReader(std::unique_ptr<ByteSource> source) : source_(std::move(source)) {
    read_directory();
  }

  const std::vector<ZipRecord>& records() const { return records_; }

  // The record named `name`, or nullptr.
  const ZipRecord* find(std::string_view name) const {
    const auto it = index_.find(std::string(name));
    return it == index_.end() ? nullptr : &records_[it->second];
  }

  // Decompresses `record` into `out`, which holds exactly record.size bytes, and checks its
  // size and CRC-32. Nothing else is allocated: a record can be read straight into a tensor.
  void read(const ZipRecord& record, void* out) {
    auto* dst = static_cast<unsigned char*>(out);
    if (record.method == 0) {
      source_->read(record.data_offset, dst, static_cast<std::size_t>(record.size));
    } else {
      inflate_into(record, dst);
    }
    if (crc_of(dst, record.size) != record.crc32)
      fail(record, "fails its CRC-32 check: its bytes are not the ones that were written");
  }

  std::string read_string(const ZipRecord& record) {
    std::string s(static_cast<std::size_t>(record.size), '\0');
    read(record, s.data());
    return s;
  }

 private:
  [[noreturn]] static void fail(const std::string& problem) { throw std::runtime_error(problem); }
  [[noreturn]] static void fail(const ZipRecord& record, std::string_view problem) {
    std::string s = "zip record " + record.name + " ";
    s += problem;
    throw std::runtime_error(s);
  }

  static std::uint64_t le(const unsigned char* p, int n) {
    std::uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
  }

  static std::uint32_t crc_of(const unsigned char* p, std::uint64_t n) {
    uLong crc = crc32(0L, Z_NULL, 0);
    while (n > 0) {
      const auto chunk = static_cast<uInt>(std::min<std::uint64_t>(n, UINT_MAX / 2));
      crc = crc32(crc, p, chunk);
      p += chunk;
      n -= chunk;
    }
    return static_cast<std::uint32_t>(crc);
  }

  // --- the end of central directory record, ZIP64's when the classic one overflows
  void read_directory() {
    const std::uint64_t file_size = source_->size();
    constexpr std::uint64_t eocd_size = 22;
    if (file_size < eocd_size) fail("not a zip archive (shorter than an empty one)");
    // The record ends the file, followed only by a comment of at most 65535 bytes.
    const std::uint64_t tail_size = std::min<std::uint64_t>(file_size, eocd_size + 0xFFFF);
    std::vector<unsigned char> tail(static_cast<std::size_t>(tail_size));
    source_->read(file_size - tail_size, tail.data(), tail.size());
    std::uint64_t eocd = UINT64_MAX;
    for (std::uint64_t i = tail_size - eocd_size + 1; i-- > 0;) {
      const unsigned char* p = tail.data() + i;
      if (le(p, 4) == 0x06054b50 && i + eocd_size + le(p + 20, 2) == tail_size) {
        eocd = file_size - tail_size + i;
        break;
      }
    }
    if (eocd == UINT64_MAX)
      fail("not a zip archive, or a truncated one: no end of central directory record");
    const unsigned char* e = tail.data() + (eocd - (file_size - tail_size));
    if (le(e + 4, 2) != 0 || le(e + 6, 2) != 0 || le(e + 8, 2) != le(e + 10, 2))
      fail("a zip archive split over several disks is not supported");
    std::uint64_t count = le(e + 10, 2);
    std::uint64_t directory_size = le(e + 12, 4);
    std::uint64_t directory_offset = le(e + 16, 4);
    std::uint64_t directory_end_limit = eocd;  // the directory lies before this
    // ZIP64: a locator just before the classic record points at the ZIP64 record, whose
    // values stand (torch.save writes one always; others only when the classic fields
    // overflow).
    unsigned char locator[20] = {};
    if (eocd >= 20) source_->read(eocd - 20, locator, 20);
    const bool overflow =
        count == 0xFFFF || directory_size == 0xFFFFFFFF || directory_offset == 0xFFFFFFFF;
    if (le(locator, 4) == 0x07064b50) {
      const std::uint64_t record = le(locator + 8, 8);
      if (record > eocd - 20 || eocd - 20 - record < 56)
        fail("the ZIP64 end of central directory lies outside the file");
      unsigned char z[56];
      source_->read(record, z, 56);
      if (le(z, 4) != 0x06064b50 || le(z + 4, 8) != eocd - 20 - record - 12)
        fail("the ZIP64 end of central directory record is missing or damaged");
      if (le(z + 16, 4) != 0 || le(z + 20, 4) != 0 || le(z + 24, 8) != le(z + 32, 8))
        fail("a zip archive split over several disks is not supported");
      count = le(z + 32, 8);
      directory_size = le(z + 40, 8);
      directory_offset = le(z + 48, 8);
      directory_end_limit = record;
    } else if (overflow) {
      fail("a ZIP64 archive without its ZIP64 locator");
    }
    if (directory_offset > directory_end_limit ||
        directory_size != directory_end_limit - directory_offset)
      fail("the central directory's size and offset do not match the file (truncated or "
           "damaged)");
    constexpr std::uint64_t entry_size = 46;
    if (count > directory_size / entry_size)
      fail("the central directory announces " + std::to_string(count) +
           " records, more than its size can hold");
    std::vector<unsigned char> directory(static_cast<std::size_t>(directory_size));
    source_->read(directory_offset, directory.data(), directory.size());
    read_entries(directory, count, directory_offset);
  }

  // --- the central directory's entries, each checked against its local header
  void read_entries(const std::vector<unsigned char>& dir, std::uint64_t count,
                    std::uint64_t directory_offset) {
    records_.reserve(static_cast<std::size_t>(count));
    std::size_t pos = 0;
    for (std::uint64_t i = 0; i < count; ++i) {
      auto need = [&](std::size_t n) {
        if (n > dir.size() - pos) fail("the central directory ends inside an entry");
      };
      need(46);
      const unsigned char* p = dir.data() + pos;
      if (le(p, 4) != 0x02014b50) fail("the central directory holds something else than entries");
      ZipRecord r;
      const auto flags = le(p + 8, 2);
      r.method = static_cast<std::uint16_t>(le(p + 10, 2));
      r.crc32 = static_cast<std::uint32_t>(le(p + 16, 4));
      r.compressed_size = le(p + 20, 4);
      r.size = le(p + 24, 4);
      const auto name_length = static_cast<std::size_t>(le(p + 28, 2));
      const auto extra_length = static_cast<std::size_t>(le(p + 30, 2));
      const auto comment_length = static_cast<std::size_t>(le(p + 32, 2));
      const auto disk = le(p + 34, 2);
      r.header_offset = le(p + 42, 4);
      pos += 46;
      need(name_length + extra_length + comment_length);
      r.name.assign(reinterpret_cast<const char*>(dir.data() + pos), name_length);
      read_zip64_extra(r, dir.data() + pos + name_length, extra_length);
      pos += name_length + extra_length + comment_length;

      if (r.name.empty()) fail("a zip record without a name");
      if (flags & 1) fail(r, "is encrypted, which is not supported");
      if (r.method != 0 && r.method != 8)
        fail(r, "uses compression method " + std::to_string(r.method) +
                    "; only stored (0) and deflate (8) are supported");
      if (disk != 0 && disk != 0xFFFF) fail("a zip archive split over several disks");
      if (r.method == 0 && r.compressed_size != r.size)
        fail(r, "is stored uncompressed, but its sizes differ");
      if (!index_.emplace(r.name, records_.size()).second)
        fail(r, "appears twice in the central directory");
      check_local_header(r, directory_offset);
      records_.push_back(std::move(r));
    }
    if (pos != dir.size()) fail("the central directory holds bytes after its last entry");

    // No two records may share bytes: a record's data ends before the next header begins.
    std::vector<const ZipRecord*> by_offset;
    for (const auto& r : records_) by_offset.push_back(&r);
    std::sort(by_offset.begin(), by_offset.end(),
              [](const ZipRecord* a, const ZipRecord* b) {
                return a->header_offset < b->header_offset;
              });
    for (std::size_t i = 1; i < by_offset.size(); ++i)
      if (by_offset[i - 1]->data_offset + by_offset[i - 1]->compressed_size >
          by_offset[i]->header_offset)
        fail(*by_offset[i - 1], "overlaps record " + by_offset[i]->name);
  }

  // ZIP64 extended information: 8-byte values for the fields that hold 0xFFFFFFFF, in order.
  static void read_zip64_extra(ZipRecord& r, const unsigned char* extra, std::size_t n) {
    const bool big_size = r.size == 0xFFFFFFFF;
    const bool big_compressed = r.compressed_size == 0xFFFFFFFF;
    const bool big_offset = r.header_offset == 0xFFFFFFFF;
    if (!big_size && !big_compressed && !big_offset) return;
    std::size_t pos = 0;
    while (pos + 4 <= n) {
      const auto id = le(extra + pos, 2);
      const auto length = static_cast<std::size_t>(le(extra + pos + 2, 2));
      pos += 4;
      if (length > n - pos) break;
      if (id == 0x0001) {
        const unsigned char* f = extra + pos;
        std::size_t used = 0;
        auto next = [&](std::uint64_t& field) {
          if (used + 8 > length) fail(r, "has a ZIP64 extra field too short for its sizes");
          field = le(f + used, 8);
          used += 8;
        };
        if (big_size) next(r.size);
        if (big_compressed) next(r.compressed_size);
        if (big_offset) next(r.header_offset);
        return;
      }
      pos += length;
    }
    fail(r, "has 32-bit sizes marked as ZIP64 but no ZIP64 extra field");
  }

  // The local header repeats the name and method; unless the sizes follow the data (flag bit
  // 3, as torch.save writes), also the CRC-32 and sizes. The data then lies between the local
  // header and the central directory.
  void check_local_header(ZipRecord& r, std::uint64_t directory_offset) {
    constexpr std::uint64_t header_size = 30;
    if (r.header_offset > directory_offset || directory_offset - r.header_offset < header_size)
      fail(r, "has its local header outside the archive's data");
    unsigned char h[header_size];
    source_->read(r.header_offset, h, header_size);
    if (le(h, 4) != 0x04034b50) fail(r, "has no local header where the directory says");
    const auto flags = le(h + 6, 2);
    if (le(h + 8, 2) != r.method)
      fail(r, "has a local header whose compression method differs from the directory's");
    const auto name_length = le(h + 26, 2);
    const auto extra_length = le(h + 28, 2);
    const std::uint64_t data = r.header_offset + header_size + name_length + extra_length;
    if (data > directory_offset || r.compressed_size > directory_offset - data)
      fail(r, "reaches past the start of the central directory (damaged sizes or offsets)");
    std::string name(static_cast<std::size_t>(name_length), '\0');
    source_->read(r.header_offset + header_size, name.data(), name.size());
    if (name != r.name) fail(r, "has a local header that names '" + name + "'");
    if (!(flags & 8)) {
      const std::uint64_t crc = le(h + 14, 4), compressed = le(h + 18, 4), size = le(h + 22, 4);
      const bool zip64 = compressed == 0xFFFFFFFF || size == 0xFFFFFFFF;
      if (crc != r.crc32 ||
          (!zip64 && (compressed != r.compressed_size || size != r.size)))
        fail(r, "has a local header whose CRC-32 or sizes differ from the directory's");
    }
    r.data_offset = data;
  }

  // Raw deflate, from the record's compressed bytes straight into `out`.
  void inflate_into(const ZipRecord& r, unsigned char* out) {
    z_stream z{};
    if (inflateInit2(&z, -MAX_WBITS) != Z_OK) fail(r, "cannot be inflated (zlib out of memory)");
    struct End {
      z_stream* z;
      ~End() { inflateEnd(z); }
    } end{&z};
    std::vector<unsigned char> buffer(std::size_t{1} << 16);
    std::uint64_t in_left = r.compressed_size, out_left = r.size, in_offset = r.data_offset;
    unsigned char probe = 0;
    bool probing = false;  // the output is full: one more byte would be one too many
    for (;;) {
      if (z.avail_in == 0 && in_left > 0) {
        const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(in_left, buffer.size()));
        source_->read(in_offset, buffer.data(), n);
        in_offset += n;
        in_left -= n;
        z.next_in = buffer.data();
        z.avail_in = static_cast<uInt>(n);
      }
      if (z.avail_out == 0) {
        if (out_left > 0) {
          const auto n = std::min<std::uint64_t>(out_left, UINT_MAX / 2);
          z.next_out = out;
          z.avail_out = static_cast<uInt>(n);
          out += n;
          out_left -= n;
        } else {
          probing = true;
          z.next_out = &probe;
          z.avail_out = 1;
        }
      }
      const uInt before_in = z.avail_in, before_out = z.avail_out;
      const int status = inflate(&z, Z_NO_FLUSH);
      if (probing && z.avail_out == 0)
        fail(r, "decompresses to more than its declared " + std::to_string(r.size) + " bytes");
      if (status == Z_STREAM_END) break;
      if (status != Z_OK && status != Z_BUF_ERROR)
        fail(r, std::string("is not a valid deflate stream: ") + (z.msg ? z.msg : "zlib error"));
      if (before_in == z.avail_in && before_out == z.avail_out) {
        if (z.avail_in == 0 && in_left == 0)
          fail(r, "ends in the middle of its deflate stream (truncated)");
        fail(r, "cannot be inflated");
      }
    }
    if (!probing && (z.avail_out != 0 || out_left != 0))
      fail(r, "decompresses to fewer than its declared " + std::to_string(r.size) + " bytes");
    if (z.avail_in != 0 || in_left != 0) fail(r, "has bytes after the end of its deflate stream");
  }

  std::unique_ptr<ByteSource> source_;
  std::vector<ZipRecord> records_;
  std::unordered_map<std::string, std::size_t> index_;
};

}  // namespace fasterai::detail
