#pragma once
// A small command-line parser shared by the examples: `--name value` options and `--switch`
// flags, `--help` with the descriptions, and a clear error for an unknown option or a value
// that does not parse (the whole string must be a number where a number is expected).

#include <cstdlib>
#include <functional>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace example {

struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Cli {
 public:
  Cli(std::string program, std::string summary)
      : program_(std::move(program)), summary_(std::move(summary)) {}

  // `--flag VALUE` stored into `target` (int, double, size_t, int64, uint64 or string).
  template <class T>
  Cli& option(std::string flag, T& target, std::string help) {
    std::ostringstream current;
    current << target;
    options_.push_back({flag, std::move(help) + " (default " + current.str() + ")", true,
                        [&target, flag](const std::string& value) { target = parse<T>(flag, value); }});
    return *this;
  }
  // `--flag` sets `target` to true.
  Cli& flag(std::string flag, bool& target, std::string help) {
    options_.push_back({std::move(flag), std::move(help), false, [&target](const std::string&) { target = true; }});
    return *this;
  }

  void parse(int argc, char** argv) const {
    for (int i = 1; i < argc; ++i) {
      const std::string_view name = argv[i];
      if (name == "--help" || name == "-h") {
        usage(std::cout);
        std::exit(0);
      }
      const Option* o = find(name);
      if (!o) throw usage_error("unknown option " + std::string(name));
      if (o->takes_value && i + 1 >= argc) throw usage_error("missing value after " + std::string(name));
      o->set(o->takes_value ? argv[++i] : "");
    }
  }

  void usage(std::ostream& os) const {
    os << "usage: " << program_ << " [options]\n" << summary_ << "\n\n";
    for (const auto& o : options_) {
      std::string left = "  " + o.flag + (o.takes_value ? " VALUE" : "");
      left.resize(std::max<size_t>(left.size() + 2, 26), ' ');
      os << left << o.help << "\n";
    }
    os << "  --help                  this message\n";
  }

  // Runs `body`, turning errors into messages and exit codes (2: bad command line).
  int run(int argc, char** argv, const std::function<int()>& body) const {
    try {
      parse(argc, argv);
      return body();
    } catch (const usage_error& e) {
      std::cerr << program_ << ": " << e.what() << "\n";
      usage(std::cerr);
      return 2;
    } catch (const std::exception& e) {
      std::cerr << program_ << ": " << e.what() << "\n";
      return 1;
    }
  }

 private:
  struct Option {
    std::string flag, help;
    bool takes_value;
    std::function<void(const std::string&)> set;
  };

  const Option* find(std::string_view name) const {
    for (const auto& o : options_)
      if (o.flag == name) return &o;
    return nullptr;
  }

  template <class T>
  static T parse(const std::string& flag, const std::string& value) {
    if constexpr (std::is_same_v<T, std::string>) {
      return value;
    } else {
      std::istringstream is(value);
      T parsed{};
      if (!(is >> parsed) || !is.eof() || (std::is_unsigned_v<T> && value.starts_with("-")))
        throw usage_error("bad value '" + value + "' for " + flag);
      return parsed;
    }
  }

  std::string program_, summary_;
  std::vector<Option> options_;
};

}  // namespace example
