// CPU forward.
//
// Dense (Cin/groups > 1): the batch is walked in chunks (batch_chunk). The chunk's kernels are
// mixed with one GEMM, routing[chunk] @ W, into scratch that is reused chunk after chunk; then
// each (example, group) multiplies its mixed kernel with the example's im2col columns (or x
// itself for 1x1 convolutions) and stores the result plus the mixed bias.
//
// Depthwise (Cin/groups == 1): float32 NCHW inputs go to the grouped convolution of
// aten_grouped.h; otherwise a direct convolution with each example's mixed taps, over a
// zero-padded copy of the input plane (NCHW or any strides), or channel-vectorised over
// channels_last inputs.
#include "paths.h"

#include <ATen/Dispatch.h>

#include <cmath>
#include <cstring>

#include <vector>

namespace condconv {
namespace cpu {
namespace {

template <typename scalar_t>
void dense_forward(const at::Tensor& x, const Operands<scalar_t>& ops, const at::Tensor& bias_mix,
                   const Geometry& g, at::Tensor& out) {
  using acc_t = typename Operands<scalar_t>::acc_t;
  const int64_t K = g.k(), L = g.out_pixels();
  const int64_t cout_g = g.out_per_group();
  const Strides xs(x), os(out);
  const bool direct = reads_x_directly<scalar_t>(g, xs);
  // Output blocks a GEMM can write directly: accumulation dtype, (h, w) one run of strides, and
  // either channel or pixel stride 1.
  const bool write_out = std::is_same<scalar_t, acc_t>::value &&
                         (g.out_h == 1 || os.h == g.out_w * os.w) && (os.w == 1 || os.c == 1);
  const int64_t chunk = batch_chunk(g, sizeof(acc_t));
  at::Tensor wmix = workspace(Slot::kMixed, {chunk, g.out_channels, K}, ops.acc_opts);
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const acc_t* bm_ptr = bias_mix.defined() ? bias_mix.const_data_ptr<acc_t>() : nullptr;

  // Ungrouped with x read in place: the chunk's GEMMs are one batched GEMM (NCHW or
  // channels_last output), whose threads share each example (faster than an example per thread:
  // 7x7 1x1 layers at batch 8 spent 0.88 ms in per-thread GEMMs against 0.69 ms batched).
  const bool batched = direct && write_out && g.groups == 1;
  for (int64_t c0 = 0; c0 < g.batch; c0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - c0);
    at::Tensor mixed = wmix.narrow(0, 0, n).view({n, g.kernel_numel()});
    mix_kernels(mixed, ops.routing, ops.weight, ops.scales, c0, n, g);
    if (batched &&
        batched_gemm_into(
            out.as_strided({n, g.out_channels, L}, {os.n, os.c, os.w},
                           out.storage_offset() + c0 * os.n),
            wmix.narrow(0, 0, n),
            x.as_strided({n, K, L}, {xs.n, xs.c, xs.w}, x.storage_offset() + c0 * xs.n),
            bias_mix.defined() ? bias_mix.narrow(0, c0, n) : at::Tensor())) {
      continue;
    }
    // One (example, group) per task; a single task runs inline and its GEMM uses every thread.
    at::parallel_for(0, n * g.groups, 1, [&](int64_t t0, int64_t t1) {
      // Dispatch state is thread-local: worker threads need the guard of their own.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor col = direct ? at::Tensor() : at::empty({K, L}, ops.acc_opts);
      at::Tensor y = write_out ? at::Tensor() : at::empty({cout_g, L}, ops.acc_opts);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = c0 + t / g.groups, gi = t % g.groups;
        const at::Tensor operand = gemm_operand<scalar_t, acc_t>(x, xs, g, direct, b, gi, col);
        const at::Tensor kernel = wmix.select(0, b - c0).narrow(0, gi * cout_g, cout_g);
        if (write_out) {
          // The GEMM writes the output block in place (NCHW: row-major; channels_last: its
          // transpose), the mixed bias folded in as the addmm input.
          at::Tensor dst = out.as_strided({cout_g, L}, {os.c, os.w},
                                          out.storage_offset() + b * os.n + gi * cout_g * os.c);
          if (bias_mix.defined()) {
            at::addmm_out(dst, bias_mix.select(0, b).narrow(0, gi * cout_g, cout_g).unsqueeze(1),
                          kernel, operand);
          } else {
            at::mm_out(dst, kernel, operand);
          }
          continue;
        }
        at::mm_out(y, kernel, operand);
        store_plane<scalar_t, acc_t>(
            y.const_data_ptr<acc_t>(), bm_ptr ? bm_ptr + b * g.out_channels + gi * cout_g : nullptr,
            cout_g, g.out_h, g.out_w, out_ptr + b * os.n + gi * cout_g * os.c, os.c, os.h, os.w);
      }
    });
  }
}

// The tensors every depthwise forward reads and writes, as pointers and strides.
template <typename scalar_t>
struct DepthwiseData {
  using acc_t = typename Operands<scalar_t>::acc_t;
  Strides xs, os;
  const scalar_t* x;
  scalar_t* out;
  const acc_t* routing;   // (B, E)
  const acc_t* weight;    // (E, |W|)
  const acc_t* bias_mix;  // (B, Cout) mixed biases, or nullptr
  const Scales& scales;
  DepthwiseData(const at::Tensor& x_, const Operands<scalar_t>& ops, const at::Tensor& bias_mix_,
                at::Tensor& out_)
      : xs(x_), os(out_), x(x_.const_data_ptr<scalar_t>()),
        out(out_.mutable_data_ptr<scalar_t>()),
        routing(ops.routing.template const_data_ptr<acc_t>()),
        weight(ops.weight.template const_data_ptr<acc_t>()),
        bias_mix(bias_mix_.defined() ? bias_mix_.const_data_ptr<acc_t>() : nullptr),
        scales(ops.scales) {}
};

// One (example, output channel) per task over a zero-padded copy of the input plane. The output
// is accumulated with the padded plane's row pitch, so with stride 1 each tap is one contiguous
// multiply-add over Ho x Wp values (the Wp - Wo columns between rows are computed and dropped).
template <typename scalar_t>
void depthwise_forward_planar(const at::Tensor& x, const Operands<scalar_t>& ops,
                              const at::Tensor& bias_mix, const Geometry& g, at::Tensor& out) {
  using acc_t = typename Operands<scalar_t>::acc_t;
  const int64_t N = g.kernel_numel();
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t wp = g.width + g.pad_left + g.pad_right;
  const int64_t hp = g.height + g.pad_top + g.pad_bottom;
  const int64_t span = (g.out_h - 1) * wp + g.out_w;  // pitched output extent
  const DepthwiseData<scalar_t> d(x, ops, bias_mix, out);

  at::parallel_for(0, g.batch * g.out_channels, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> plane(hp * wp), y(g.out_h * wp), w(taps);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / g.out_channels, co = t % g.out_channels;
      const int64_t ci = co / g.out_per_group();
      mix_experts<acc_t>(d.weight + co * taps, N, d.routing + b * g.experts, g.experts, taps,
                         w.data());
      d.scales.scale_taps(w.data(), b, co, 1, g);
      padded_plane<scalar_t, acc_t>(d.x + b * d.xs.n + ci * d.xs.c, d.xs.h, d.xs.w, g,
                                    plane.data());
      std::fill(y.begin(), y.end(), acc_t(0));
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        for (int64_t j = 0; j < g.kernel_w; ++j) {
          const acc_t tap = w[i * g.kernel_w + j];
          const acc_t* src = plane.data() + i * g.dilation_h * wp + j * g.dilation_w;
          if (g.stride_h == 1 && g.stride_w == 1) {
            acc_t* yp = y.data();
            for (int64_t q = 0; q < span; ++q) yp[q] += tap * src[q];
          } else {
            for (int64_t oh = 0; oh < g.out_h; ++oh) {
              acc_t* yr = y.data() + oh * wp;
              const acc_t* sr = src + oh * g.stride_h * wp;
              for (int64_t ow = 0; ow < g.out_w; ++ow) yr[ow] += tap * sr[ow * g.stride_w];
            }
          }
        }
      }
      const acc_t add = d.bias_mix ? d.bias_mix[b * g.out_channels + co] : acc_t(0);
      scalar_t* dst = d.out + b * d.os.n + co * d.os.c;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          dst[oh * d.os.h + ow * d.os.w] = static_cast<scalar_t>(y[oh * wp + ow] + add);
        }
      }
    }
  });
}

// One block of channels of one example, channels_last: per output pixel, the accumulators take
// every tap inside the image. With kFull the count is the compile-time kMax, so the accumulators
// stay in vector registers; otherwise it is n. xb, bias and out point at the block's first
// channel; w is (taps, kMax). Taps in the padding are skipped, except with kPadding (non-finite
// mixed taps: a NaN/Inf routing weight): there they add tap * 0, NaN as in every other path
// (the zero-padded planes, im2col), so that the example's whole output is NaN.
template <typename scalar_t, typename acc_t, int64_t kMax, bool kFull, bool kPadding = false>
void depthwise_channels_last_block(const scalar_t* xb, const Strides& xs, const Geometry& g,
                                   const acc_t* w, const acc_t* bias, scalar_t* out,
                                   const Strides& os, int64_t n) {
  const int64_t count = kFull ? kMax : n;
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      acc_t acc[kMax];
      for (int64_t c = 0; c < count; ++c) acc[c] = bias ? bias[c] : acc_t(0);
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        const int64_t ih = oh * g.stride_h + i * g.dilation_h - g.pad_top;
        const bool row_outside = ih < 0 || ih >= g.height;
        if (row_outside && !kPadding) continue;
        for (int64_t j = 0; j < g.kernel_w; ++j) {
          const int64_t iw = ow * g.stride_w + j * g.dilation_w - g.pad_left;
          if (row_outside || iw < 0 || iw >= g.width) {
            if (kPadding) {
              const acc_t* wk = w + (i * g.kernel_w + j) * kMax;
              for (int64_t c = 0; c < count; ++c) acc[c] += wk[c] * acc_t(0);
            }
            continue;
          }
          const scalar_t* xp = xb + ih * xs.h + iw * xs.w;
          const acc_t* wk = w + (i * g.kernel_w + j) * kMax;
#pragma omp simd
          for (int64_t c = 0; c < count; ++c) acc[c] += wk[c] * static_cast<acc_t>(xp[c]);
        }
      }
      scalar_t* op = out + oh * os.h + ow * os.w;
      for (int64_t c = 0; c < count; ++c) op[c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

// channels_last, one output channel per input channel: one (example, block of channels) per
// task, the inner loop running over contiguous channels.
template <typename scalar_t>
void depthwise_forward_channels_last(const at::Tensor& x, const Operands<scalar_t>& ops,
                                     const at::Tensor& bias_mix, const Geometry& g,
                                     at::Tensor& out) {
  using acc_t = typename Operands<scalar_t>::acc_t;
  constexpr int64_t kBlock = 64;
  const int64_t N = g.kernel_numel();
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t blocks = ceil_div(g.out_channels, kBlock);
  const DepthwiseData<scalar_t> d(x, ops, bias_mix, out);

  at::parallel_for(0, g.batch * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> w(taps * kBlock), mixed(taps * kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks, c0 = (t % blocks) * kBlock;
      const int64_t n = std::min(kBlock, g.out_channels - c0);
      // The block's (channel, tap) kernels are contiguous in each expert: mixed in one pass,
      // then transposed to (tap, channel) so the inner loops run over contiguous channels.
      mix_experts<acc_t>(d.weight + c0 * taps, N, d.routing + b * g.experts, g.experts,
                         n * taps, mixed.data());
      d.scales.scale_taps(mixed.data(), b, c0, n, g);
      bool finite = true;
      for (int64_t c = 0; c < n; ++c) {
        for (int64_t k = 0; k < taps; ++k) {
          const acc_t v = mixed[c * taps + k];
          finite = finite && std::isfinite(v);
          w[k * kBlock + c] = v;
        }
      }
      const scalar_t* xb = d.x + b * d.xs.n + c0;
      const acc_t* bias = d.bias_mix ? d.bias_mix + b * g.out_channels + c0 : nullptr;
      scalar_t* ob = d.out + b * d.os.n + c0;
      if (!finite) {
        depthwise_channels_last_block<scalar_t, acc_t, kBlock, false, true>(
            xb, d.xs, g, w.data(), bias, ob, d.os, n);
      } else if (n == kBlock) {
        depthwise_channels_last_block<scalar_t, acc_t, kBlock, true>(xb, d.xs, g, w.data(), bias,
                                                                    ob, d.os, n);
      } else {
        depthwise_channels_last_block<scalar_t, acc_t, kBlock, false>(xb, d.xs, g, w.data(),
                                                                     bias, ob, d.os, n);
      }
    }
  });
}

// bfloat16 1x1 convolutions (ForwardPath::kBf16Pointwise in paths.h: one group, stride 1, no
// padding, (h, w) one run of strides in x and out): the kernels are mixed straight from the bfloat16 experts into bfloat16 scratch,
// accumulating in float32 (the generic route would first convert all E experts to float32: twice
// the bytes, read twice), then bfloat16 GEMMs (float32 accumulation) write the output in place:
// one batched GEMM per chunk for NCHW or channels_last output, else one GEMM per example.

// bfloat16 <-> float32 on the raw bits, in forms the compiler vectorises (c10::BFloat16's
// conversions are scalar calls): widening is a shift; narrowing rounds to nearest even, NaN kept
// a quiet NaN.
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
}

// mixed[b, k] = sum_e routing[b, e] weight[e, k] for b in [0, n), bfloat16 in and out, float32
// accumulation; parallel over blocks of k. Each 32-column strip of the E experts is widened once
// into a small float32 tile, and each example's 32 sums stay in registers across the experts:
// one store per output element. (Accumulating expert by expert into a float32 buffer spent its
// time in that buffer's loads and stores: 1.25 ms against 0.57 ms per 192x1152 kernel at batch
// 8 on one thread.)
void mix_bf16(const at::BFloat16* w, const float* r, int64_t n, int64_t experts, int64_t N,
              at::BFloat16* mixed) {
  static_assert(sizeof(at::BFloat16) == sizeof(uint16_t), "bfloat16 is 16 bits");
  constexpr int64_t kBlock = 512, kStrip = 32;
  const uint16_t* wbits = reinterpret_cast<const uint16_t*>(w);
  uint16_t* mbits = reinterpret_cast<uint16_t*>(mixed);
  at::parallel_for(0, ceil_div(N, kBlock), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(experts * kStrip);
    for (int64_t k0 = t0 * kBlock; k0 < std::min(N, t1 * kBlock); k0 += kStrip) {
      const int64_t len = std::min(kStrip, N - k0);
      for (int64_t e = 0; e < experts; ++e) {
        const uint16_t* src = wbits + e * N + k0;
        float* dst = tile.data() + e * kStrip;
        if (len == kStrip) {
#pragma omp simd
          for (int64_t j = 0; j < kStrip; ++j) dst[j] = bf16_bits_to_float(src[j]);
        } else {
          for (int64_t j = 0; j < kStrip; ++j) dst[j] = j < len ? bf16_bits_to_float(src[j]) : 0.f;
        }
      }
      for (int64_t b = 0; b < n; ++b) {
        float sum[kStrip] = {};
        const float* rb = r + b * experts;
        for (int64_t e = 0; e < experts; ++e) {
          const float c = rb[e];
          const float* we = tile.data() + e * kStrip;
#pragma omp simd
          for (int64_t j = 0; j < kStrip; ++j) sum[j] += c * we[j];
        }
        uint16_t* dst = mbits + b * N + k0;
        if (len == kStrip) {
#pragma omp simd
          for (int64_t j = 0; j < kStrip; ++j) dst[j] = float_to_bf16_bits(sum[j]);
        } else {
          for (int64_t j = 0; j < len; ++j) dst[j] = float_to_bf16_bits(sum[j]);
        }
      }
    }
  });
}

void bf16_pointwise_forward(const at::Tensor& x, const at::Tensor& routing,
                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const Geometry& g, at::Tensor& out) {
  const int64_t K = g.k(), L = g.out_pixels(), N = g.kernel_numel();
  const Strides xs(x), os(out);
  const at::Tensor r = routing.to(at::kFloat).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor bias_mix =
      bias.has_value() ? at::mm(r, bias->to(at::kFloat)).to(at::kBFloat16) : at::Tensor();
  const int64_t chunk = batch_chunk(g, sizeof(at::BFloat16));
  at::Tensor wmix = workspace(Slot::kMixed, {chunk, N}, x.options());
  for (int64_t c0 = 0; c0 < g.batch; c0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - c0);
    mix_bf16(w.const_data_ptr<at::BFloat16>(), r.const_data_ptr<float>() + c0 * g.experts, n,
             g.experts, N, wmix.mutable_data_ptr<at::BFloat16>());
    // One batched GEMM (oneDNN's bfloat16 batched GEMM measured 0.15 ms where eight
    // per-example GEMMs of 192x1152 @ 1152x49 took 0.49 ms).
    if (batched_gemm_into(
            out.as_strided({n, g.out_channels, L}, {os.n, os.c, os.w},
                           out.storage_offset() + c0 * os.n),
            wmix.narrow(0, 0, n).view({n, g.out_channels, K}),
            x.as_strided({n, K, L}, {xs.n, xs.c, xs.w}, x.storage_offset() + c0 * xs.n),
            bias_mix.defined() ? bias_mix.narrow(0, c0, n) : at::Tensor())) {
      continue;
    }
    at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = c0 + t;
        const at::Tensor operand = x.as_strided({K, L}, {xs.c, xs.w}, x.storage_offset() + b * xs.n);
        const at::Tensor kernel = wmix.select(0, t).view({g.out_channels, K});
        at::Tensor dst = out.as_strided({g.out_channels, L}, {os.c, os.w},
                                        out.storage_offset() + b * os.n);
        if (bias_mix.defined()) {
          at::addmm_out(dst, bias_mix.select(0, b).unsqueeze(1), kernel, operand);
        } else {
          at::mm_out(dst, kernel, operand);
        }
      }
    });
  }
}

template <typename scalar_t>
at::Tensor forward_typed(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const ScaleArgs& scales,
                         const Geometry& g) {
  const ForwardPath path = forward_path(x, g, scales.any());
  // The ATen paths return ATen's convolution output; the others fill this one.
  at::Tensor out;
  if (path != ForwardPath::kAtenDepthwise && path != ForwardPath::kAtenDense) {
    out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                    x.options().memory_format(x.suggest_memory_format()));
  }
  if (path == ForwardPath::kBf16Pointwise) {
    bf16_pointwise_forward(x, routing, weight.reshape({g.experts, g.kernel_numel()}), bias, g,
                           out);
    return out;
  }
  const Operands<scalar_t> ops(routing, weight, Operands<scalar_t>::acc_type, scales);
  // Mixed biases are B x Cout: small, so computed for the whole batch at once.
  at::Tensor bias_mix =
      bias.has_value() ? at::mm(ops.routing, bias->to(Operands<scalar_t>::acc_type)).contiguous()
                       : at::Tensor();
  ops.scales.scale_bias(bias_mix);
  switch (path) {
    case ForwardPath::kAtenDepthwise:
      return grouped_depthwise_forward(x, ops.routing, ops.weight, ops.scales, bias_mix, g);
    case ForwardPath::kAtenDense:
      return grouped_dense_forward(x, ops.routing, ops.weight, ops.scales, bias_mix, g);
    case ForwardPath::kDense:
      dense_forward<scalar_t>(x, ops, bias_mix, g, out);
      break;
    case ForwardPath::kDepthwiseChannelsLast:
      depthwise_forward_channels_last<scalar_t>(x, ops, bias_mix, g, out);
      break;
    case ForwardPath::kDepthwisePlanar:
      depthwise_forward_planar<scalar_t>(x, ops, bias_mix, g, out);
      break;
    case ForwardPath::kBf16Pointwise:  // returned above
      break;
  }
  return out;
}

}  // namespace

at::Tensor forward(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const ScaleArgs& scales,
                   const Geometry& g) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "condconv2d_cpu",
      [&] { return forward_typed<scalar_t>(x, routing, weight, bias, scales, g); });
}

}  // namespace cpu
}  // namespace condconv
