// shiftaddvit: terminal progress bar and result tables.
//
//   sav::Progress bar("train ep 1/5", total_steps, "img");
//   bar.update(step, batch_size, {{"loss", 0.41}, {"acc", 0.87}});   // redraws at most ~10x/s
//   bar.finish();
//
//   sav::Table t({"model", "batch", "ms", "img/s"});
//   t.add({"vit_fmnist", "64", "12.3", "5200"});
//   t.print(std::cout);
#pragma once

#include <chrono>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace sav {

class Progress {
 public:
  Progress(std::string label, int64_t total, std::string unit = "it", bool enabled = true);
  // `done` steps finished, `items` processed in this step (images), metrics shown after the bar.
  void update(int64_t done, int64_t items, const std::vector<std::pair<std::string, double>>& metrics = {});
  void finish();
  double elapsed_s() const;
  double rate() const;  // items per second so far

 private:
  void draw(bool final);
  std::string label_, unit_;
  int64_t total_, done_ = 0, items_ = 0;
  bool enabled_, tty_;
  std::vector<std::pair<std::string, double>> metrics_;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  void print(std::ostream& os) const;
  std::string csv() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

std::string fmt(double v, int precision = 2);
std::string fmt_duration(double seconds);  // 1h02m, 3m05s, 12.3s

}  // namespace sav
