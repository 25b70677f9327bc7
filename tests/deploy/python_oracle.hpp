#pragma once
// Running Debian's python3-torch from the deploy tests: a script in a temporary folder, tensors
// passed as text with every digit of a float (9 significant digits round-trip a float32).

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace deploy_test {

// The python3 with torch and torchvision that CMake found, or "" when there is none.
inline std::string python() { return FASTERAI_PYTHON; }

// A fresh folder under the system's temporary directory, removed with its files on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& name)
      : path_(std::filesystem::temp_directory_path() /
              (name + "_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  std::filesystem::path operator/(const std::string& file) const { return path_ / file; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

inline void write_text(const std::filesystem::path& path, const torch::Tensor& t) {
  std::ofstream f(path);
  f.precision(9);
  const auto flat = t.detach().to(torch::kFloat64).contiguous().reshape({-1});
  const double* v = flat.data_ptr<double>();
  for (std::int64_t i = 0; i < flat.numel(); ++i) f << v[i] << ' ';
}

inline torch::Tensor read_text(const std::filesystem::path& path) {
  std::ifstream f(path);
  std::vector<float> values;
  for (float v; f >> v;) values.push_back(v);
  return torch::tensor(values);
}

// Runs `script` with the oracle's python3 in `dir`; returns the exit status. Output goes to
// dir/python.log, which `log` reads back for the test's message.
inline int run_python(const TempDir& dir, const std::string& script) {
  const auto file = dir / "script.py";
  std::ofstream(file) << script;
  const std::string cmd = "cd '" + dir.path().string() + "' && " + python() + " '" +
                          file.string() + "' > python.log 2>&1";
  return std::system(cmd.c_str());
}

// Python's torch.jit.load of dir/`file`, called on `x` without gradients; `more` runs after it,
// with the module as `m` (what it prints goes to the log). The exit status, and the output as a
// flat tensor (undefined when the script failed).
struct PythonForward {
  int status;
  torch::Tensor output;
};
inline PythonForward python_forward(const TempDir& dir, const std::string& file, const torch::Tensor& x,
                                    const std::string& more = "") {
  write_text(dir / "x.txt", x);
  std::ostringstream shape;
  for (const auto size : x.sizes()) shape << size << ", ";
  const int status = run_python(dir, "import torch\n"
                                     "m = torch.jit.load('" + file + "')\n"
                                     "x = torch.tensor([float(v) for v in open('x.txt').read().split()]).view(" +
                                         shape.str() + ")\n"
                                     "with torch.no_grad():\n"
                                     "    y = m(x)\n"
                                     "open('y.txt', 'w').write(' '.join('%.9g' % v for v in y.flatten().tolist()))\n" +
                                         more);
  return {status, status == 0 ? read_text(dir / "y.txt") : torch::Tensor()};
}

inline std::string log(const TempDir& dir) {
  std::ifstream f(dir / "python.log");
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace deploy_test
