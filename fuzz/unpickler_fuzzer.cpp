// libFuzzer target: any bytes, read as data.pkl alone (no zip archive, no checksums in the
// way), with storages of zeros. Only std::runtime_error (the unpickler's refusals) may come
// out; anything else (a crash, a sanitizer report, a timeout, memory beyond -rss_limit_mb) is
// a finding. C++17, as zip_reader_fuzzer.cpp explains.
//   cmake --build build-fuzz
//   mkdir -p pickles && for f in some/*.pt; do unzip -p "$f" '*/data.pkl' > pickles/$(basename "$f").pkl; done
//   build-fuzz/fuzz/fuzz_unpickler pickles -timeout=2 -rss_limit_mb=2048 -max_total_time=600

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <fasterai/io/unpickler.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace pickle = fasterai::detail::pickle;
  // Storages as the archive would give them, capped as ReadLimits::max_tensor_bytes caps them.
  const pickle::StorageLoader zeros = [](const std::string&, c10::ScalarType dtype,
                                         std::int64_t numel) {
    if (numel > (std::int64_t{1} << 20)) throw std::runtime_error("storage too large");
    return torch::zeros({numel}, torch::TensorOptions().dtype(dtype));
  };
  try {
    pickle::unpickle(std::string(reinterpret_cast<const char*>(data), size), zeros);
  } catch (const std::runtime_error&) {
  }
  return 0;
}
