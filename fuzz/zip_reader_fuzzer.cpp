// libFuzzer target: any bytes, read as a zip archive, every record inflated and checked.
// Only std::runtime_error (the reader's refusals) may come out; anything else (a crash, a
// sanitizer report, a timeout, memory beyond -rss_limit_mb) is a finding.
//
// Built as C++17: clang 14 cannot compile LibTorch 1.13's headers as C++20 against libstdc++ 12,
// so the fuzz targets take the reader's pieces that need no C++20 (zip_reader.hpp,
// unpickler.hpp); whole files go through the mutation test (tests/io/mutation.cpp).
//   cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DFASTERAI_FUZZ=ON \
//         -DFASTERAI_BUILD_TESTS=OFF -DFASTERAI_BUILD_EXAMPLES=OFF -DFASTERAI_BUILD_BENCHMARKS=OFF
//   cmake --build build-fuzz
//   mkdir -p zips && cp some/*.pt zips/    # e.g. files written by save_state_dict
//   build-fuzz/fuzz/fuzz_zip_reader zips -timeout=2 -rss_limit_mb=2048 -max_total_time=600

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string_view>
#include <vector>

#include <fasterai/io/zip_reader.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace d = fasterai::detail;
  try {
    d::ZipReader zip(std::make_unique<d::MemorySource>(
        std::string_view(reinterpret_cast<const char*>(data), size)));
    for (const d::ZipRecord& r : zip.records()) {
      // The state_dict reader caps record sizes (ReadLimits); so does this target.
      if (r.size > (std::uint64_t{1} << 26)) continue;
      std::vector<unsigned char> out(static_cast<std::size_t>(r.size));
      zip.read(r, out.data());
    }
  } catch (const std::runtime_error&) {
  }
  return 0;
}
