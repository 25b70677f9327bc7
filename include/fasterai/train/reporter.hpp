#pragma once
// What a Learner shows of a fit: fastai's table (a row per epoch), a progress display within
// the epoch (a bar on a terminal, a few plain lines in logs and pipes) and the CSV log.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

#include <fasterai/core/error.hpp>

namespace fasterai {

enum class Progress {
  Auto,   // a bar on a terminal, plain lines otherwise
  Bar,    // a bar redrawn in place (\r)
  Lines,  // a line at each quarter of an epoch
  None,   // only the table
};

// One row of the table.
struct EpochRecord {
  int epoch = 0;
  double train_loss = 0;  // smoothed, as fastai
  double valid_loss = std::numeric_limits<double>::quiet_NaN();  // NaN without validation data
  std::vector<double> metrics;                                     // in LearnerOptions order
  double seconds = 0;
};

namespace detail {

// fastai's smoothed loss: an exponential moving average, debiased for its first steps.
struct SmoothLoss {
  double beta = 0.98;
  double value_ = 0;
  std::int64_t count = 0;
  void add(double x) {
    ++count;
    value_ = beta * value_ + (1 - beta) * x;
  }
  double value() const {
    return count == 0 ? std::numeric_limits<double>::quiet_NaN()
                      : value_ / (1 - std::pow(beta, static_cast<double>(count)));
  }
};

inline std::string format_time(double seconds) {
  const auto total = static_cast<std::int64_t>(std::llround(std::max(0.0, seconds)));
  std::ostringstream os;
  os << std::setfill('0');
  if (total >= 3600) os << total / 3600 << ':' << std::setw(2) << (total / 60) % 60;
  else os << std::setw(2) << total / 60;
  os << ':' << std::setw(2) << total % 60;
  return os.str();
}

inline bool is_terminal(const std::ostream* out) {
#if __has_include(<unistd.h>)
  if (out == &std::cout) return ::isatty(STDOUT_FILENO) != 0;
  if (out == &std::cerr || out == &std::clog) return ::isatty(STDERR_FILENO) != 0;
#endif
  (void)out;
  return false;
}

// The table, the progress display and the CSV log of one fit.
class Reporter {
 public:
  // `metrics`: the names of the metric columns; `csv_log`: empty for none; `csv_fresh`: start
  // the CSV file (with its header) rather than append to it.
  Reporter(std::ostream* out, Progress progress, const std::vector<std::string>& metrics,
           const std::string& csv_log, bool csv_fresh)
      : out_(out), mode_(resolve(progress, out)) {
    columns_ = {"epoch", "train_loss", "valid_loss"};
    columns_.insert(columns_.end(), metrics.begin(), metrics.end());
    columns_.push_back("time");
    if (!csv_log.empty()) {
      csv_.open(csv_log, csv_fresh ? std::ios::trunc : std::ios::app);
      if (!csv_)
        throw_argument_error("fasterai::Learner", "csv_log", csv_log,
                             "a path where a CSV file can be written");
      if (csv_fresh) {
        for (size_t i = 0; i < columns_.size(); ++i) csv_ << (i ? "," : "") << columns_[i];
        csv_ << '\n';
        csv_.flush();
      }
    }
  }

  void header() {
    if (!out_) return;
    for (size_t i = 0; i < columns_.size(); ++i)
      *out_ << columns_[i] << (i + 1 < columns_.size() ? "  " : "\n");
    out_->flush();
  }

  void row(const EpochRecord& r) {
    end_bar();
    std::vector<std::string> cells{std::to_string(r.epoch), number(r.train_loss),
                                   number(r.valid_loss)};
    for (double m : r.metrics) cells.push_back(number(m));
    cells.push_back(format_time(r.seconds));
    if (out_) {
      for (size_t i = 0; i < cells.size(); ++i) {
        const size_t width = std::max(columns_[i].size(), cells[i].size());
        *out_ << std::left << std::setw(static_cast<int>(width)) << cells[i] << std::right
              << (i + 1 < cells.size() ? "  " : "\n");
      }
      out_->flush();
    }
    if (csv_.is_open()) {
      csv_ << r.epoch << ',' << number(r.train_loss) << ',' << number(r.valid_loss);
      for (double m : r.metrics) csv_ << ',' << number(m);
      csv_ << ',' << std::fixed << std::setprecision(3) << r.seconds << '\n';
      csv_.flush();
    }
  }

  // Progress within a phase; `done` of `total` batches, `loss` the smoothed loss so far.
  void progress(const char* phase, int epoch, int epochs, std::int64_t done, std::int64_t total,
                double loss, double elapsed) {
    if (!out_ || mode_ == Progress::None || total <= 0) return;
    const auto now = std::chrono::steady_clock::now();
    if (mode_ == Progress::Bar) {
      // Redraw at most ten times a second, and at the end.
      if (done < total && drawn_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
      last_draw_ = now;
      drawn_ = true;
      constexpr int width = 30;
      const auto filled = static_cast<int>(width * done / total);
      std::ostringstream line;
      line << "\repoch " << epoch << '/' << epochs << ' ' << phase << " |";
      for (int i = 0; i < width; ++i) line << (i < filled ? "\u2588" : "-");
      line << "| " << done << '/' << total << ' ' << format_time(elapsed) << '<'
           << format_time(done > 0 ? elapsed * double(total - done) / double(done) : 0.0);
      if (!std::isnan(loss)) line << ' ' << std::fixed << std::setprecision(4) << loss;
      line << "\033[K";  // clear what a longer, earlier line left
      *out_ << line.str() << std::flush;
    } else if (mode_ == Progress::Lines && std::string_view(phase) == "train") {
      // Quarters of the epoch, the last quarter being the table row.
      const std::int64_t quarter = done * 4 / total;
      if (quarter <= last_quarter_ || done == total) return;
      last_quarter_ = quarter;
      *out_ << "epoch " << epoch << " train " << done << '/' << total << " batches, loss "
            << std::fixed << std::setprecision(4) << loss << std::defaultfloat << ", "
            << format_time(elapsed) << " elapsed, ~"
            << format_time(elapsed * double(total - done) / double(done)) << " left\n"
            << std::flush;
    }
  }

  void new_epoch() { last_quarter_ = 0; }

  // End a bar that is being redrawn, so that what follows starts on its own line.
  void end_bar() {
    if (drawn_ && out_) *out_ << "\r\033[K" << std::flush;
    drawn_ = false;
  }

 private:
  std::ostream* out_;
  Progress mode_;
  std::vector<std::string> columns_;
  std::ofstream csv_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_draw_{};
  std::int64_t last_quarter_ = 0;

  static Progress resolve(Progress p, const std::ostream* out) {
    if (p != Progress::Auto) return p;
    return is_terminal(out) ? Progress::Bar : Progress::Lines;
  }
  static std::string number(double v) {
    if (std::isnan(v)) return "nan";
    std::ostringstream os;
    os << std::fixed << std::setprecision(6) << v;
    return os.str();
  }
};

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace detail
}  // namespace fasterai
