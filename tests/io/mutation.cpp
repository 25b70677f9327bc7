// A deterministic mutation test of the state_dict reader: valid files written here, then
// damaged by seeded byte flips, truncations and pickle-aware edits. Whatever the input, the
// reader either refuses it with a state_dict_error or returns exactly what the file says:
// - a damaged archive (CRC-32 covers every record) reads to the original tensors or not at all;
// - a pickle edited and re-archived with valid checksums yields only tensors that view the
//   bytes of its storage records, within bounds (or, for PyTorch 2.x's conjugate and negative
//   views, those bytes with the flags resolved). The edits are byte-level (splices, deletions,
//   repeats) and semantic: one opcode of the pickle at a time, a size, stride, offset or numel
//   set to an edge value, a memo reference moved to another entry, a string (a storage key,
//   a metadata key) or a flag replaced, a tuple's arity changed, an opcode dropped or doubled.
//   The seeds include PyTorch 2.6's files of tests/data/files/ (metadata, every dtype);
// and no input crashes, takes more than 2 s, or grows the process's peak memory by 256 MB.
//
// By default this runs 42,000 inputs (a few seconds). To run longer, e.g. 2.8 million:
//   FASTERAI_MUTATIONS=100000 FASTERAI_MUTATION_SEED=2 build/tests/test_io "[mutation]"
// (FASTERAI_MUTATIONS inputs per seed file and strategy; under scripts/sanitize.sh too).

#include <sys/resource.h>

#include "catch.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <fasterai/io/state_dict.hpp>
#include <fasterai/io/zip_reader.hpp>

#include "io_testing.hpp"

using namespace io_testing;
using fasterai::StateDict;
namespace nn = torch::nn;
using namespace std::string_literals;

namespace {

std::int64_t setting(const char* name, std::int64_t fallback) {
  const char* value = std::getenv(name);
  return value != nullptr ? std::strtoll(value, nullptr, 10) : fallback;
}

long peak_rss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

// A valid file and what it holds: its records, and the state_dict it reads to.
struct SeedFile {
  std::string name;
  std::string bytes;
  std::vector<ZipEntry> entries;  // data.pkl first
  StateDict expected;
};

SeedFile seed_from(std::string name, std::string bytes) {
  SeedFile seed{std::move(name), std::move(bytes), {}, StateDict()};
  fasterai::detail::ZipReader zip(std::make_unique<fasterai::detail::MemorySource>(seed.bytes));
  for (const auto& r : zip.records()) seed.entries.push_back({r.name, zip.read_string(r), false});
  std::stable_partition(seed.entries.begin(), seed.entries.end(),
                        [](const ZipEntry& e) { return e.name.ends_with("/data.pkl"); });
  seed.expected = read_bytes_as_state_dict(seed.bytes);
  return seed;
}

std::vector<SeedFile> seed_files() {
  TempDir dir;
  std::vector<SeedFile> seeds;
  // fasterai's own writer: a small network with a conv, batch norm and linear layer.
  torch::manual_seed(0);
  nn::Sequential small(nn::Conv2d(1, 2, 3), nn::BatchNorm2d(2), nn::Flatten(), nn::Linear(8, 3));
  fasterai::save_state_dict(small, dir / "small.pt");
  seeds.push_back(seed_from("save_state_dict", read_bytes(dir / "small.pt")));
  // The same records deflated, in a plain zip.
  std::vector<ZipEntry> deflated = seeds.front().entries;
  for (auto& e : deflated) e.deflated = true;
  seeds.push_back(seed_from("deflated", build_zip(deflated).bytes));
  // torch::pickle_save: shared storage, offsets, transposed strides, type tags, several dtypes.
  const auto w = torch::arange(6, torch::kFloat).reshape({2, 3});
  c10::Dict<std::string, at::Tensor> dict;
  dict.insert("w", w);
  dict.insert("transposed", w.t());
  dict.insert("row", w[1]);
  dict.insert("count", torch::tensor(std::int64_t{5}));
  dict.insert("half", torch::ones({2}, torch::kHalf));
  const auto pickled = torch::pickle_save(dict);
  seeds.push_back(seed_from("pickle_save", std::string(pickled.begin(), pickled.end())));
  // Python's opcodes for a one-entry OrderedDict with _metadata (SETITEM, BUILD, MEMOIZE, ...).
  const auto one = torch::arange(6, torch::kFloat) / 4;
  seeds.push_back(
      seed_from("python_one_entry",
                build_zip(torch_entries(one_entry_pickle(), {{"0", floats(one)}})).bytes));
  // PyTorch 2.6's files: conjugate and negative views ({'conj': True} metadata), every dtype.
  for (const char* name : {"torch26_conj.pt", "torch26_neg.pt", "torch26_matrix.pt"})
    seeds.push_back(seed_from(name, read_bytes(fs::path(FASTERAI_TEST_DATA_DIR) / name)));
  return seeds;
}

bool same(const StateDict& a, const StateDict& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].key() != b[i].key() || a[i].value().scalar_type() != b[i].value().scalar_type() ||
        a[i].value().sizes() != b[i].value().sizes() || !torch::equal(a[i].value(), b[i].value()))
      return false;
  return true;
}

std::string bytes_of(const torch::Tensor& t) {
  return std::string(static_cast<const char*>(t.data_ptr()), static_cast<std::size_t>(t.nbytes()));
}

// Every tensor is a view, within bounds, of a storage whose bytes are one record's bytes, or
// (a conjugate or negative view) the record's values conjugated, negated or both.
bool views_the_records(const StateDict& state, const std::vector<ZipEntry>& entries) {
  std::set<std::string> records;
  for (const auto& e : entries) records.insert(e.data);
  auto resolved = [&](const torch::Tensor& storage) {
    const auto dtype = storage.scalar_type();
    const auto size = static_cast<std::int64_t>(c10::elementSize(dtype));
    for (const auto& e : entries) {
      if (e.data.size() != static_cast<std::size_t>(storage.numel() * size) || e.data.empty())
        continue;
      torch::Tensor r = torch::empty({storage.numel()}, torch::TensorOptions().dtype(dtype));
      std::memcpy(r.data_ptr(), e.data.data(), e.data.size());
      std::vector<torch::Tensor> forms;
      if (dtype != torch::kBool) forms.push_back(torch::neg(r));
      if (r.is_complex()) {
        forms.push_back(torch::conj_physical(r));
        forms.push_back(torch::neg(torch::conj_physical(r)));
      }
      for (const auto& f : forms)
        if (bytes_of(f) == bytes_of(storage)) return true;
    }
    return false;
  };
  for (const auto& item : state) {
    const torch::Tensor& t = item.value();
    const auto storage_bytes = static_cast<std::int64_t>(t.storage().nbytes());
    std::int64_t last = t.storage_offset();
    bool empty = false;
    for (std::int64_t d = 0; d < t.dim(); ++d) {
      if (t.size(d) == 0) empty = true;
      if (t.size(d) > 0) last += (t.size(d) - 1) * t.stride(d);
    }
    if (!empty && (last + 1) * t.element_size() > storage_bytes) return false;
    const std::string bytes(static_cast<const char*>(t.storage().data()),
                            static_cast<std::size_t>(storage_bytes));
    if (!records.contains(bytes) &&
        !resolved(torch::empty({0}, t.options()).set_(t.storage(), 0,
                                                       {storage_bytes / t.element_size()}, {1})))
      return false;
  }
  return true;
}

// Pickle opcodes and arguments worth splicing in: every opcode the reader knows, plus a few
// it must refuse.
const std::vector<std::string>& fragments() {
  static const std::vector<std::string> f{
      "("s, "."s, "N"s, "\x88"s, "\x89"s, "K\x00"s, "K\xff"s, "M\xff\xff"s, "J\xff\xff\xff\x7f"s,
      "\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x40"s, "\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f"s,
      "\x8a\x01\xff"s, "G\x7f\xf0\x00\x00\x00\x00\x00\x00"s, "X\x01\x00\x00\x00"s "a"s,
      "\x8c\x01"s "0"s, "]"s, "}"s, ")"s, "t"s, "\x85"s, "\x86"s, "\x87"s, "a"s, "e"s, "s"s, "u"s, "b"s, "R"s,
      "Q"s, "q\x00"s, "q\x01"s, "h\x00"s, "h\x01"s, "h\x07"s, "r\x00\x00\x00\x00"s, "j\x00\x00\x00\x00"s,
      "\x94"s, "\x95\x00\x00\x00\x00\x00\x00\x00\x00"s, "\x93"s, "ctorch\nFloatStorage\n"s,
      "ctorch._utils\n_rebuild_tensor_v2\n"s, "ccollections\nOrderedDict\n"s, "cos\nsystem\n"s,
      "0"s, "1"s, "2"s, "\x80\x05"s, "\xff"s};
  return f;
}

std::string mutate_pickle(std::string p, std::mt19937_64& rng) {
  auto pick = [&](std::size_t n) { return std::uniform_int_distribution<std::size_t>(0, n)(rng); };
  const int edits = 1 + static_cast<int>(pick(2));
  for (int e = 0; e < edits && !p.empty(); ++e) {
    switch (pick(5)) {
      case 0: p[pick(p.size() - 1)] = static_cast<char>(pick(255)); break;  // any byte
      case 1: p.insert(pick(p.size()), fragments()[pick(fragments().size() - 1)]); break;
      case 2: {  // an opcode replaced by another fragment
        const std::size_t at = pick(p.size() - 1);
        p.replace(at, 1 + pick(std::min<std::size_t>(8, p.size() - at - 1)),
                  fragments()[pick(fragments().size() - 1)]);
        break;
      }
      case 3: {  // a slice deleted
        const std::size_t at = pick(p.size() - 1);
        p.erase(at, 1 + pick(std::min<std::size_t>(32, p.size() - at - 1)));
        break;
      }
      case 4: {  // a slice repeated
        const std::size_t at = pick(p.size() - 1);
        const std::string slice = p.substr(at, 1 + pick(std::min<std::size_t>(64, p.size() - at - 1)));
        p.insert(pick(p.size()), slice);
        break;
      }
      default: {  // a number set to an extreme: every BININT1 argument is a size, stride or key
        const auto k = p.find('K', pick(p.size() - 1));
        if (k != std::string::npos && k + 1 < p.size())
          p.replace(k, 2, fragments()[9 + pick(2)]);
        break;
      }
    }
  }
  return p;
}

// The opcodes of a pickle, as [position, length) spans, up to the first one that is not in a
// state_dict's subset (or the end).
std::vector<std::pair<std::size_t, std::size_t>> opcodes(const std::string& p) {
  std::vector<std::pair<std::size_t, std::size_t>> ops;
  std::size_t at = 0;
  auto le = [&](std::size_t from, int n) {
    std::size_t v = 0;
    for (int i = 0; i < n; ++i) v |= std::size_t{static_cast<unsigned char>(p[from + i])} << (8 * i);
    return v;
  };
  while (at < p.size()) {
    std::size_t n = 1;
    switch (static_cast<unsigned char>(p[at])) {
      case 0x80: case 'K': case 'q': case 'h': n = 2; break;
      case 'M': n = 3; break;
      case 'J': case 'r': case 'j': n = 5; break;
      case 'G': case 0x95: n = 9; break;
      case 0x8a: case 0x8c:
        if (at + 1 >= p.size()) return ops;
        n = 2 + le(at + 1, 1);
        break;
      case 'X':
        if (at + 4 >= p.size()) return ops;
        n = 5 + le(at + 1, 4);
        break;
      case 'c': {
        const auto first = p.find('\n', at);
        const auto second = first == std::string::npos ? first : p.find('\n', first + 1);
        if (second == std::string::npos) return ops;
        n = second + 1 - at;
        break;
      }
      case '.': case '(': case 'N': case 0x88: case 0x89: case ')': case 0x85: case 0x86:
      case 0x87: case 't': case ']': case 'a': case 'e': case '}': case 's': case 'u': case 'b':
      case 'R': case 'Q': case 0x94: case 0x93: break;
      default: return ops;
    }
    if (at + n > p.size()) return ops;
    ops.emplace_back(at, n);
    at += n;
  }
  return ops;
}

std::string long1(std::int64_t v) {
  std::string s = "\x8a\x08"s;
  for (int i = 0; i < 8; ++i) s += static_cast<char>(static_cast<std::uint64_t>(v) >> (8 * i));
  return s;
}

std::string unicode(std::string_view text) {
  std::string s = "X"s;
  for (int i = 0; i < 4; ++i) s += static_cast<char>(text.size() >> (8 * i));
  return s.append(text);
}

// One semantic edit: an opcode replaced by another of its kind with a value chosen to hurt.
std::string edit_semantically(std::string p, std::mt19937_64& rng) {
  auto pick = [&](std::size_t n) { return std::uniform_int_distribution<std::size_t>(0, n)(rng); };
  const auto ops = opcodes(p);
  if (ops.empty()) return p;
  const auto [at, n] = ops[pick(ops.size() - 1)];
  const auto op = static_cast<unsigned char>(p[at]);
  static const std::vector<std::int64_t> numbers{
      0, 1, 2, 3, 5, 6, -1, -2, 63, 64, 65, 4096, (std::int64_t{1} << 31) - 1, std::int64_t{1} << 32,
      std::int64_t{1} << 62, std::numeric_limits<std::int64_t>::max(),
      std::numeric_limits<std::int64_t>::min()};
  static const std::vector<std::string> strings{"conj", "neg", "zero", "storage", "0", "1", "cpu", ""};
  static const std::vector<std::string> tuples{")", "\x85", "\x86", "\x87", "t"};
  std::string replacement;
  switch (op) {
    case 'K': case 'M': case 'J': case 0x8a:  // sizes, strides, offsets, numels
      replacement = long1(numbers[pick(numbers.size() - 1)]);
      break;
    case 'h': case 'q':  // a memo reference moved
      replacement = p.substr(at, 1) + static_cast<char>(pick(20));
      break;
    case 'j': case 'r':
      replacement = p.substr(at, 1) + static_cast<char>(pick(20)) + "\0\0\0"s;
      break;
    case 'X': case 0x8c:  // storage keys, dict keys, metadata keys
      replacement = unicode(strings[pick(strings.size() - 1)]);
      break;
    case 0x88: replacement = "\x89"s; break;
    case 0x89: replacement = "\x88"s; break;
    case ')': case 0x85: case 0x86: case 0x87: case 't':
      replacement = tuples[pick(tuples.size() - 1)];
      break;
    default:  // any other opcode dropped or doubled
      replacement = pick(1) == 0 ? ""s : p.substr(at, n) + p.substr(at, n);
  }
  p.replace(at, n, replacement);
  return p;
}

enum class Outcome { refused, read_same, read_other };

}  // namespace

TEST_CASE("mutated state_dict files are refused or read as they say", "[mutation]") {
  const std::int64_t per_strategy = setting("FASTERAI_MUTATIONS", 1500);
  std::mt19937_64 rng(static_cast<std::uint64_t>(setting("FASTERAI_MUTATION_SEED", 1)));
  const auto seeds = seed_files();
  const long peak_before = peak_rss_kib();
  double slowest = 0;
  std::int64_t inputs = 0, refused = 0, read = 0;

  // Reads `bytes`; a read must satisfy `valid`.
  auto run = [&](const std::string& bytes, const auto& valid) {
    const auto start = std::chrono::steady_clock::now();
    bool ok = true;
    try {
      const StateDict state = read_bytes_as_state_dict(bytes);
      ++read;
      ok = valid(state);
    } catch (const fasterai::state_dict_error&) {
      ++refused;
    }
    slowest = std::max(
        slowest, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    ++inputs;
    return ok;
  };

  for (const SeedFile& seed : seeds) {
    INFO("seed file " << seed.name);
    auto pick = [&](std::size_t n) {
      return std::uniform_int_distribution<std::size_t>(0, n)(rng);
    };
    auto unchanged = [&](const StateDict& s) { return same(s, seed.expected); };
    std::int64_t bad = 0;
    // Byte flips and random bytes anywhere: CRC-32 and the directory checks leave two outcomes.
    for (std::int64_t i = 0; i < per_strategy; ++i) {
      std::string bytes = seed.bytes;
      const int changes = 1 + static_cast<int>(pick(3));
      for (int c = 0; c < changes; ++c) {
        const std::size_t at = pick(bytes.size() - 1);
        if (pick(1) == 0)
          bytes[at] ^= static_cast<char>(1 << pick(7));
        else
          bytes[at] = static_cast<char>(pick(255));
      }
      if (!run(bytes, unchanged)) ++bad;
    }
    // Truncations, and bytes appended.
    for (std::int64_t i = 0; i < per_strategy; ++i) {
      std::string bytes = seed.bytes.substr(0, pick(seed.bytes.size() - 1));
      if (!run(bytes, unchanged)) ++bad;
    }
    // Pickle-aware edits, re-archived with valid checksums so the unpickler sees them.
    for (std::int64_t i = 0; i < per_strategy; ++i) {
      std::vector<ZipEntry> entries = seed.entries;
      entries.front().data = mutate_pickle(entries.front().data, rng);
      if (!run(build_zip(entries).bytes,
               [&](const StateDict& s) { return views_the_records(s, seed.entries); }))
        ++bad;
    }
    // Semantic edits, one to three opcodes at a time.
    for (std::int64_t i = 0; i < per_strategy; ++i) {
      std::vector<ZipEntry> entries = seed.entries;
      const int edits = 1 + static_cast<int>(pick(2));
      for (int e = 0; e < edits; ++e)
        entries.front().data = edit_semantically(entries.front().data, rng);
      if (!run(build_zip(entries).bytes,
               [&](const StateDict& s) { return views_the_records(s, seed.entries); }))
        ++bad;
    }
    CHECK(bad == 0);
  }
  const long grown_mib = (peak_rss_kib() - peak_before) / 1024;
  INFO(inputs << " inputs: " << refused << " refused, " << read << " read; slowest " << slowest
              << " s; peak memory grew by " << grown_mib << " MiB");
  CHECK(inputs == static_cast<std::int64_t>(seeds.size()) * 4 * per_strategy);
  CHECK(refused > 0);
  CHECK(read > 0);
  CHECK(slowest < 2.0);
#if !defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer keeps freed memory in quarantine (256 MB by default): there the bound
  // says nothing about the reader, so it is checked in the plain build only.
  CHECK(grown_mib < 256);
#endif
  WARN(inputs << " mutated inputs: " << refused << " refused, " << read << " read, slowest "
              << slowest << " s");
}
