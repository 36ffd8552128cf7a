// Shared by the C++ tests: a float64 comparison that prints one line per check.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <string>

// a equals b in shape and to 1e-10 of b's scale (float64 rounding); prints "<config> <what>".
inline bool close(const torch::Tensor& a, const torch::Tensor& b, const std::string& config,
                  const std::string& what) {
  const bool same_shape = a.sizes() == b.sizes();
  const double err = same_shape ? (a - b).abs().max().item<double>() : -1.0;
  const double scale = std::max(1.0, b.abs().max().item<double>());
  const bool ok = same_shape && err <= 1e-10 * scale;
  std::printf("%-12s %-14s max err %.3e %s\n", config.c_str(), what.c_str(), err,
              ok ? "ok" : (same_shape ? "FAIL" : "FAIL (shape)"));
  return ok;
}
