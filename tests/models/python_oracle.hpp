#pragma once
// The Python oracle of the model tests: Debian's python3-torch and torchvision, run on a script
// that reads and writes files in a temporary directory.

#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "catch.hpp"

namespace fasterai::testing {

// A fresh directory under the system's temporary directory, removed with everything in it.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "fasterai_zoo_XXXXXX").string();
    REQUIRE(mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
};

// Runs `script` with the oracle's Python, the temporary directory as its argument.
inline void run_python(const TempDir& dir, const std::string& script) {
  const auto file = dir.path / "oracle.py";
  std::ofstream(file) << script;
  const std::string cmd = std::string(FASTERAI_PYTHON) + " " + file.string() + " " +
                          dir.path.string();
  REQUIRE(std::system(cmd.c_str()) == 0);
}

}  // namespace fasterai::testing
