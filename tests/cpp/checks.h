// Shared by the C++ tests: a float64 comparison that prints one line per check.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <string>

// a equals the float64 b in shape and to tol of b's scale (default: float64 rounding); a NaN
// fails. Prints "<config> <what> max err ...".
inline bool close(const torch::Tensor& a, const torch::Tensor& b, const std::string& config,
                  const std::string& what, double tol = 1e-10) {
  const bool same_shape = a.sizes() == b.sizes();
  const double err =
      same_shape ? (a.to(torch::kFloat64) - b).abs().max().item<double>() : -1.0;
  const double scale = std::max(1.0, b.abs().max().item<double>());
  const bool ok = same_shape && err <= tol * scale;
  std::printf("%-22s %-14s max err %.3e %s\n", config.c_str(), what.c_str(), err,
              ok ? "ok" : (same_shape ? "FAIL" : "FAIL (shape)"));
  return ok;
}
