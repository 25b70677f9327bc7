#pragma once
// The Python oracle of the model tests: Debian's python3-torch and torchvision, run on a script
// that reads and writes files in a temporary directory.

#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/io/state_dict.hpp>

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

// "p name d0 d1 ..." for every parameter, as the oracle scripts print them from Python.
inline std::vector<std::string> parameter_lines(const torch::nn::Module& model) {
  std::vector<std::string> lines;
  for (const auto& p : model.named_parameters()) {
    std::ostringstream os;
    os << "p " << p.key();
    for (auto d : p.value().sizes()) os << ' ' << d;
    lines.push_back(os.str());
  }
  return lines;
}

inline std::vector<std::string> read_lines(const std::filesystem::path& file) {
  std::vector<std::string> lines;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// Logits equal to PyTorch's up to float32 rounding over the layers (and not all zero).
inline void check_logits_close(const torch::Tensor& logits, const torch::Tensor& expected) {
  REQUIRE(logits.sizes() == expected.sizes());
  const double scale = expected.abs().max().item<double>();
  const double difference = (logits - expected).abs().max().item<double>();
  INFO("max |logit| " << scale << ", max |difference| " << difference);
  CHECK(scale > 0.0);
  CHECK(difference <= 1e-4 * scale);
}

// The two directions of a state_dict exchange with the oracle script, which wrote `python.pt`
// (its model's weights) and `io.pt` (an input, its logits, and the logits of its model after
// loading `ours`' weights): Python's weights in a fresh model of ours give Python's logits, and
// ours in Python's model give ours.
template <class Make, class Model>
void check_logits_both_ways(const TempDir& dir, Make make, Model& ours) {
  auto io = read_state_dict(dir.path / "io.pt");
  torch::NoGradGuard no_grad;
  {
    INFO("Python's weights in our model");
    auto model = make();
    load_state_dict(*model, dir.path / "python.pt");
    model->eval();
    check_logits_close(model->forward(io["input"]), io["logits"]);
  }
  {
    INFO("our weights in Python's model");
    check_logits_close(ours->forward(io["input"]), io["ours_logits"]);
  }
}

}  // namespace fasterai::testing
