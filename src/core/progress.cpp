#include "core/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <sstream>

namespace sav {

std::string fmt(double v, int precision) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(precision) << v;
  return os.str();
}

std::string fmt_duration(double s) {
  char buf[32];
  if (s < 60) {
    std::snprintf(buf, sizeof buf, "%.1fs", s);
  } else if (s < 3600) {
    std::snprintf(buf, sizeof buf, "%dm%02ds", int(s) / 60, int(s) % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%dh%02dm", int(s) / 3600, (int(s) % 3600) / 60);
  }
  return buf;
}

Progress::Progress(std::string label, int64_t total, std::string unit, bool enabled)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), enabled_(enabled), tty_(isatty(2)) {
  start_ = last_draw_ = std::chrono::steady_clock::now();
}

double Progress::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

double Progress::rate() const {
  double e = elapsed_s();
  return e > 0 ? items_ / e : 0.0;
}

void Progress::update(int64_t done, int64_t items, const std::vector<std::pair<std::string, double>>& metrics) {
  done_ = done;
  items_ += items;
  metrics_ = metrics;
  auto now = std::chrono::steady_clock::now();
  // On a terminal redraw ~10x a second; in a log, a line every 10 s.
  double gap = std::chrono::duration<double>(now - last_draw_).count();
  if (gap >= (tty_ ? 0.1 : 10.0) || done == total_) {
    last_draw_ = now;
    draw(false);
  }
}

void Progress::draw(bool final) {
  if (!enabled_) return;
  const double e = elapsed_s();
  const double frac = total_ > 0 ? std::min(1.0, double(done_) / total_) : 0.0;
  const int width = 24;
  int filled = static_cast<int>(frac * width);
  std::string bar(filled, '#');
  bar += std::string(width - filled, '.');
  double eta = frac > 0 ? e * (1.0 - frac) / frac : 0.0;
  std::ostringstream os;
  os << label_ << " [" << bar << "] " << done_ << "/" << total_ << " " << fmt(rate(), 0) << " " << unit_ << "/s";
  if (final)
    os << " in " << fmt_duration(e);
  else
    os << " ETA " << fmt_duration(eta);
  for (auto& [k, v] : metrics_) os << " " << k << " " << fmt(v, 4);
  std::string line = os.str();
  if (tty_)
    std::cerr << "\r" << line << "\033[K" << (final ? "\n" : "") << std::flush;
  else
    std::cerr << line << "\n" << std::flush;
}

void Progress::finish() { draw(true); }

void Table::print(std::ostream& os) const {
  std::vector<size_t> w(header_.size(), 0);
  for (size_t i = 0; i < header_.size(); ++i) w[i] = header_[i].size();
  for (auto& r : rows_)
    for (size_t i = 0; i < r.size() && i < w.size(); ++i) w[i] = std::max(w[i], r[i].size());
  auto line = [&](const std::vector<std::string>& r) {
    os << "|";
    for (size_t i = 0; i < w.size(); ++i) {
      std::string c = i < r.size() ? r[i] : "";
      os << " " << c << std::string(w[i] - c.size(), ' ') << " |";
    }
    os << "\n";
  };
  line(header_);
  os << "|";
  for (size_t i = 0; i < w.size(); ++i) os << std::string(w[i] + 2, '-') << "|";
  os << "\n";
  for (auto& r : rows_) line(r);
}

std::string Table::csv() const {
  std::ostringstream os;
  auto line = [&](const std::vector<std::string>& r) {
    for (size_t i = 0; i < r.size(); ++i) os << (i ? "," : "") << r[i];
    os << "\n";
  };
  line(header_);
  for (auto& r : rows_) line(r);
  return os.str();
}

}  // namespace sav
