// Operator schemas, every input check, and the CPU and CUDA bindings. The kernels behind it trust
// their inputs: the rules on the tensors live here, once, for every backend (the Python ones call
// them as torch.ops.condconv.check_inputs / check_backward_inputs).
#include "condconv.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <sstream>

namespace condconv {
namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_list(at::IntArrayRef values, size_t length, int64_t minimum, const char* name) {
  TORCH_CHECK_VALUE(values.size() == length, "condconv2d: argument '", name, "' must have ",
                    length, " values, got ", values.size());
  for (int64_t v : values) {
    TORCH_CHECK_VALUE(v >= minimum, "condconv2d: argument '", name, "' must be >= ", minimum,
                      ", got ", shape_str(values));
  }
}

}  // namespace

Geometry check_inputs(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() == 4, "condconv2d: argument 'x' must be 4-D (B, Cin, H, W), got ",
                    x.dim(), "-D with shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(routing.dim() == 2,
                    "condconv2d: argument 'routing' must be 2-D (B, E), got shape ",
                    shape_str(routing.sizes()));
  TORCH_CHECK_VALUE(weight.dim() == 5,
                    "condconv2d: argument 'weight' must be 5-D (E, Cout, Cin/groups, kh, kw), "
                    "got shape ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()),
                   "condconv2d: argument 'x' must be float32, float64, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "condconv2d: argument 'weight' must ",
                   "have x's dtype ", x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK_TYPE(routing.scalar_type() == x.scalar_type() || routing.scalar_type() == at::kFloat,
                   "condconv2d: argument 'routing' must have x's dtype ", x.scalar_type(),
                   " or float32, got ", routing.scalar_type());
  TORCH_CHECK_VALUE(routing.device() == x.device() && weight.device() == x.device(),
                    "condconv2d: arguments 'routing' and 'weight' must be on x's device ",
                    x.device(), ", got ", routing.device(), " and ", weight.device());
  TORCH_CHECK_VALUE(groups >= 1, "condconv2d: argument 'groups' must be >= 1 (and <= 2**63 - 1), got ",
                    groups);
  check_list(stride, 2, 1, "stride");
  check_list(padding, 4, 0, "padding");
  check_list(dilation, 2, 1, "dilation");

  Geometry g{};
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.experts = weight.size(0);
  g.out_channels = weight.size(1);
  g.kernel_h = weight.size(3);
  g.kernel_w = weight.size(4);
  g.groups = groups;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_top = padding[0];
  g.pad_bottom = padding[1];
  g.pad_left = padding[2];
  g.pad_right = padding[3];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];

  // As torch.nn.functional.conv2d: an empty batch is fine, an empty image is not (its output
  // would be the padding's alone).
  TORCH_CHECK_VALUE(g.height >= 1 && g.width >= 1,
                    "condconv2d: argument 'x' must have a non-zero height and width, got shape ",
                    shape_str(x.sizes()));
  TORCH_CHECK_VALUE(g.experts >= 1 && g.out_channels >= 1 && weight.size(2) >= 1 &&
                        g.kernel_h >= 1 && g.kernel_w >= 1,
                    "condconv2d: argument 'weight' must have non-zero sizes, got ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(routing.size(0) == g.batch && routing.size(1) == g.experts,
                    "condconv2d: argument 'routing' must have shape (B, E) = (", g.batch, ", ",
                    g.experts, ") from x's batch and weight's experts, got ",
                    shape_str(routing.sizes()));
  TORCH_CHECK_VALUE(g.in_channels % groups == 0 && g.out_channels % groups == 0,
                    "condconv2d: argument 'groups' = ", groups,
                    " must divide x's channels (", g.in_channels, ") and weight's Cout (",
                    g.out_channels, ")");
  TORCH_CHECK_VALUE(weight.size(2) * groups == g.in_channels,
                    "condconv2d: argument 'weight' must have Cin/groups = ",
                    g.in_channels / groups, " in dim 2 for x with ", g.in_channels,
                    " channels and groups=", groups, ", got shape ", shape_str(weight.sizes()));
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) == g.experts && b.size(1) == g.out_channels,
                      "condconv2d: argument 'bias' must have shape (E, Cout) = (", g.experts,
                      ", ", g.out_channels, "), got ", shape_str(b.sizes()));
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), "condconv2d: argument 'bias' must ",
                     "have x's dtype ", x.scalar_type(), ", got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == x.device(), "condconv2d: argument 'bias' must be on x's ",
                      "device ", x.device(), ", got ", b.device());
  }
  // Sizes from the arguments without int64 overflow: a dilation or padding near 2**63 must not
  // wrap around into a small, accepted geometry (as Python's exact integers in _args.py).
  int64_t padded_h = 0, padded_w = 0, span_h = 0, span_w = 0;
  const bool padded_ok = !c10::add_overflows(g.height, g.pad_top, &padded_h) &&
                         !c10::add_overflows(padded_h, g.pad_bottom, &padded_h) &&
                         !c10::add_overflows(g.width, g.pad_left, &padded_w) &&
                         !c10::add_overflows(padded_w, g.pad_right, &padded_w);
  TORCH_CHECK_VALUE(padded_ok, "condconv2d: argument 'padding' = ", shape_str(padding),
                    " makes the padded input larger than 2**63 - 1");
  const bool span_h_ok = !c10::mul_overflows(g.kernel_h - 1, g.dilation_h, &span_h) &&
                         !c10::add_overflows(span_h, int64_t{1}, &span_h);
  const bool span_w_ok = !c10::mul_overflows(g.kernel_w - 1, g.dilation_w, &span_w) &&
                         !c10::add_overflows(span_w, int64_t{1}, &span_w);
  TORCH_CHECK_VALUE(span_h_ok && span_w_ok && span_h <= padded_h && span_w <= padded_w,
                    "condconv2d: argument 'weight' has a dilated kernel of ",
                    span_h_ok ? std::to_string(span_h) : std::string("(over 2**63)"), "x",
                    span_w_ok ? std::to_string(span_w) : std::string("(over 2**63)"),
                    ", larger than the padded input of ", padded_h, "x", padded_w);
  g.out_h = (padded_h - span_h) / g.stride_h + 1;
  g.out_w = (padded_w - span_w) / g.stride_w + 1;
  // A stride past the last window start reads the first window alone: the same output with the
  // stride cut to that window count, which keeps every later index product (here and in oneDNN)
  // inside int64.
  g.stride_h = std::min(g.stride_h, padded_h - span_h + 1);
  g.stride_w = std::min(g.stride_w, padded_w - span_w + 1);
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  uint64_t bytes = static_cast<uint64_t>(x.element_size()), plane_bytes = 0;
  bool fits = !c10::mul_overflows(bytes, static_cast<uint64_t>(g.out_h), &bytes) &&
              !c10::mul_overflows(bytes, static_cast<uint64_t>(g.out_w), &bytes) &&
              !c10::mul_overflows(bytes, static_cast<uint64_t>(std::max<int64_t>(g.out_channels, 1)),
                                  &bytes);
  plane_bytes = bytes;
  fits = fits && !c10::mul_overflows(plane_bytes, static_cast<uint64_t>(g.batch), &bytes) &&
         plane_bytes <= static_cast<uint64_t>(INT64_MAX) &&
         bytes <= static_cast<uint64_t>(INT64_MAX);
  TORCH_CHECK_VALUE(fits, "condconv2d: the output of shape ", shape_str(out_shape),
                    " would be larger than 2**63 - 1 bytes (arguments 'x', 'weight', 'padding')");
  return g;
}

void check_scales(const at::Tensor& x, const Geometry& g, const ScaleArgs& scales) {
  const int64_t taps[] = {g.kernel_h, g.kernel_w};
  const struct {
    const c10::optional<at::Tensor>& t;
    const char* name;
    std::vector<int64_t> shape;
    const char* meaning;
  } specs[] = {{scales.in, "in_scale", {g.batch, g.in_channels}, "(B, Cin)"},
               {scales.out, "out_scale", {g.batch, g.out_channels}, "(B, Cout)"},
               {scales.tap, "tap_scale", {g.batch, taps[0], taps[1]}, "(B, kh, kw)"}};
  for (const auto& spec : specs) {
    if (!spec.t.has_value()) continue;
    const at::Tensor& t = *spec.t;
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(spec.shape), "condconv2d: argument '",
                      spec.name, "' must have shape ", spec.meaning, " = ", shape_str(spec.shape),
                      ", got ", shape_str(t.sizes()));
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat,
                     "condconv2d: argument '", spec.name, "' must have x's dtype ",
                     x.scalar_type(), " or float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), "condconv2d: argument '", spec.name,
                      "' must be on x's device ", x.device(), ", got ", t.device());
  }
}

Geometry check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& routing, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               std::array<bool, 4> output_mask, const ScaleArgs& scales) {
  const Geometry g = check_inputs(x, routing, weight, bias, stride, padding, dilation, groups);
  check_scales(x, g, scales);
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape),
                    "condconv2d_backward: argument 'grad_out' must have the output shape ",
                    shape_str(out_shape), ", got ", shape_str(grad_out.sizes()));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(),
                   "condconv2d_backward: argument 'grad_out' must have x's dtype ",
                   x.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(),
                    "condconv2d_backward: argument 'grad_out' must be on x's device ", x.device(),
                    ", got ", grad_out.device());
  TORCH_CHECK_VALUE(bias.has_value() || !output_mask[3],
                    "condconv2d_backward: argument 'output_mask' asks for grad_bias but "
                    "'bias' is None");
  return g;
}

namespace {

// native_forward for one device's kernels: checks, the empty cases, then the kernel.
template <ForwardKernel* kernel>
at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        const c10::optional<at::Tensor>& in_scale,
                        const c10::optional<at::Tensor>& out_scale,
                        const c10::optional<at::Tensor>& tap_scale) {
  const Geometry g = check_inputs(x, routing, weight, bias, stride, padding, dilation, groups);
  const ScaleArgs scales{in_scale, out_scale, tap_scale};
  check_scales(x, g, scales);
  // The kernels are the derivative formulas themselves: nothing below records autograd history.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (g.batch == 0 || g.out_channels * g.out_h * g.out_w == 0) {
    return at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                     x.options().memory_format(x.suggest_memory_format()));
  }
  return kernel(x, routing, weight, bias, scales, g);
}

using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// native_backward for one device's kernels: checks, the outputs, the empty batch, the kernel.
template <BackwardKernel* kernel>
BackwardResult backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& routing, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             std::array<bool, 4> output_mask,
                             const c10::optional<at::Tensor>& in_scale,
                             const c10::optional<at::Tensor>& out_scale,
                             const c10::optional<at::Tensor>& tap_scale,
                             std::array<bool, 3> scale_mask) {
  const ScaleArgs scales{in_scale, out_scale, tap_scale};
  const Geometry g = check_backward_inputs(grad_out, x, routing, weight, bias, stride, padding,
                                           dilation, groups, output_mask, scales);
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const auto none = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor grad_x = output_mask[0]
                          ? at::empty(x.sizes(), x.options().memory_format(
                                                     x.suggest_memory_format()))
                          : none(x);
  at::Tensor grad_routing = output_mask[1] ? at::empty(routing.sizes(), routing.options())
                                           : none(routing);
  at::Tensor grad_weight = output_mask[2] ? at::empty(weight.sizes(), weight.options())
                                          : none(weight);
  at::Tensor grad_bias = output_mask[3]
                             ? at::empty({g.experts, g.out_channels}, weight.options())
                             : none(weight);
  // A present scale's gradient comes back where scale_mask asks for it (zeros for an empty
  // batch); an entry for an absent scale is ignored.
  const std::array<bool, 3> wanted{in_scale.has_value() && scale_mask[0],
                                   out_scale.has_value() && scale_mask[1],
                                   tap_scale.has_value() && scale_mask[2]};
  const auto scale_grad = [&](const c10::optional<at::Tensor>& t, bool want) {
    return want ? at::zeros(t->sizes(), t->options()) : none(x);
  };
  ScaleGrads scale_grads{scale_grad(in_scale, wanted[0]), scale_grad(out_scale, wanted[1]),
                         scale_grad(tap_scale, wanted[2])};
  if (g.batch > 0) {
    ScaleGrads asked{wanted[0] ? scale_grads.in : at::Tensor(),
                     wanted[1] ? scale_grads.out : at::Tensor(),
                     wanted[2] ? scale_grads.tap : at::Tensor()};
    kernel(grad_out, x, routing, weight, bias, scales, g, output_mask, grad_x, grad_routing,
           grad_weight, grad_bias, asked);
  } else {
    // An empty batch contributes nothing to the parameter gradients.
    if (output_mask[2]) grad_weight.zero_();
    if (output_mask[3]) grad_bias.zero_();
  }
  return {grad_x, grad_routing, grad_weight, grad_bias, scale_grads.in, scale_grads.out,
          scale_grads.tap};
}

}  // namespace

at::Tensor condconv2d(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("condconv::native_forward", "")
                       .typed<decltype(forward_impl<cpu::forward>)>();
  return op.call(x, routing, weight, bias, stride, padding, dilation, groups, c10::nullopt,
                 c10::nullopt, c10::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> condconv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 4> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("condconv::native_backward", "")
                       .typed<decltype(backward_impl<cpu::backward>)>();
  const auto grads = op.call(grad_out, x, routing, weight, bias, stride, padding, dilation,
                             groups, output_mask, c10::nullopt, c10::nullopt, c10::nullopt,
                             std::array<bool, 3>{true, true, true});
  return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), std::get<3>(grads)};
}

// The checks as operators, for the backends written in Python (reference, triton) and the fake
// implementations: check_inputs returns the output shape (B, Cout, Ho, Wo) of valid arguments;
// both raise what the kernels' own checks raise.
std::vector<int64_t> check_inputs_op(const at::Tensor& x, const at::Tensor& routing,
                                     const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups,
                                     const c10::optional<at::Tensor>& in_scale,
                                     const c10::optional<at::Tensor>& out_scale,
                                     const c10::optional<at::Tensor>& tap_scale) {
  const Geometry g = check_inputs(x, routing, weight, bias, stride, padding, dilation, groups);
  check_scales(x, g, ScaleArgs{in_scale, out_scale, tap_scale});
  return {g.batch, g.out_channels, g.out_h, g.out_w};
}

void check_backward_inputs_op(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& routing, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              std::array<bool, 4> output_mask,
                              const c10::optional<at::Tensor>& in_scale,
                              const c10::optional<at::Tensor>& out_scale,
                              const c10::optional<at::Tensor>& tap_scale) {
  check_backward_inputs(grad_out, x, routing, weight, bias, stride, padding, dilation, groups,
                        output_mask, {in_scale, out_scale, tap_scale});
}

// Test-only: the CPU paths a call takes, and all their names (csrc/cpu/paths.h).
std::vector<std::string> cpu_paths(const at::Tensor& x, const at::Tensor& routing,
                                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, bool scaled) {
  return cpu::path_names(x, check_inputs(x, routing, weight, bias, stride, padding, dilation,
                                         groups), scaled);
}

namespace {
std::atomic<int64_t> cuda_pointwise_cluster_mode{cuda::kClusterFragments};

// The switch of cuda::pointwise_cluster: set where `mode` is given (0 off, 1 the kernel's
// products through ldmatrix and mma.sync, 2 through wmma, 3 the wgmma kernel); the setting after.
int64_t cuda_pointwise_cluster_op(c10::optional<int64_t> mode) {
  if (mode.has_value()) {
    TORCH_CHECK(*mode >= cuda::kClusterOff && *mode <= cuda::kClusterWgmma,
                "cuda_pointwise_cluster: mode must be 0 (off), 1 (ldmatrix and mma.sync), 2 "
                "(wmma) or 3 (wgmma), got ", *mode);
#if defined(CONDCONV_WITH_CUDA) && !defined(CONDCONV_SM90A)
    TORCH_CHECK(*mode != cuda::kClusterWgmma,
                "cuda_pointwise_cluster: mode 3 (wgmma) needs the extension built for sm_90a "
                "only (TORCH_CUDA_ARCH_LIST=9.0a)");
#endif
    cuda_pointwise_cluster_mode.store(*mode);
  }
  return cuda_pointwise_cluster_mode.load();
}

std::atomic<bool> cuda_pointwise_kgrad_on{false};

// The switch of cuda::pointwise_kgrad_on: set where `mode` is given (0 off, 1 on); the setting
// after.
int64_t cuda_pointwise_kgrad_op(c10::optional<int64_t> mode) {
  if (mode.has_value()) {
    TORCH_CHECK(*mode == 0 || *mode == 1,
                "cuda_pointwise_kgrad: mode must be 0 (off) or 1 (on), got ", *mode);
    cuda_pointwise_kgrad_on.store(*mode == 1);
  }
  return cuda_pointwise_kgrad_on.load() ? 1 : 0;
}

// Whether CUDA device `device` runs the Hopper kernels' sm_90 code (cuda::hopper_kernels_run): 1
// or 0; 0 in a build without CUDA.
int64_t cuda_hopper_kernels_op(int64_t device) {
#ifdef CONDCONV_WITH_CUDA
  TORCH_CHECK(device >= 0, "cuda_hopper_kernels: device must be a CUDA device index, got ",
              device);
  return cuda::hopper_kernels_run(static_cast<int>(device)) ? 1 : 0;
#else
  (void)device;
  return 0;
#endif
}
}  // namespace

bool cuda::pointwise_kgrad_on() {
  return cuda_pointwise_kgrad_on.load(std::memory_order_relaxed);
}

cuda::ClusterMode cuda::pointwise_cluster() {
  return static_cast<ClusterMode>(cuda_pointwise_cluster_mode.load(std::memory_order_relaxed));
}

#define CONDCONV_SCALES "Tensor? in_scale=None, Tensor? out_scale=None, Tensor? tap_scale=None"

TORCH_LIBRARY(condconv, m) {
  m.def(
      "native_forward(Tensor x, Tensor routing, Tensor weight, Tensor? bias, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups, " CONDCONV_SCALES ") -> Tensor");
  m.def(
      "native_backward(Tensor grad_out, Tensor x, Tensor routing, Tensor weight, Tensor? bias, "
      "int[2] stride, int[4] padding, int[2] dilation, int groups, bool[4] output_mask, "
      CONDCONV_SCALES ", bool[3] scale_mask=[True, True, True]) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpu_paths(Tensor x, Tensor routing, Tensor weight, Tensor? bias, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups, bool scaled=False) -> str[]");
  m.def("cpu_path_names() -> str[]", &cpu::all_path_names);
  m.def("cuda_pointwise_cluster(int? mode=None) -> int", &cuda_pointwise_cluster_op);
  m.def("cuda_pointwise_kgrad(int? mode=None) -> int", &cuda_pointwise_kgrad_op);
  m.def("cuda_hopper_kernels(int device) -> int", &cuda_hopper_kernels_op);
  // Composite: they read sizes, dtypes and devices only, so they run on any device (meta and fake
  // tensors with concrete sizes included).
  m.def(
      "check_inputs(Tensor x, Tensor routing, Tensor weight, Tensor? bias, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups, " CONDCONV_SCALES ") -> int[]",
      &check_inputs_op);
  m.def(
      "check_backward_inputs(Tensor grad_out, Tensor x, Tensor routing, Tensor weight, "
      "Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, int groups, "
      "bool[4] output_mask, " CONDCONV_SCALES ") -> ()",
      &check_backward_inputs_op);
}

#undef CONDCONV_SCALES

TORCH_LIBRARY_IMPL(condconv, CPU, m) {
  m.impl("native_forward", &forward_impl<cpu::forward>);
  m.impl("native_backward", &backward_impl<cpu::backward>);
  m.impl("cpu_paths", &cpu_paths);
}

#ifdef CONDCONV_WITH_CUDA
TORCH_LIBRARY_IMPL(condconv, CUDA, m) {
  m.impl("native_forward", &forward_impl<cuda::forward>);
  m.impl("native_backward", &backward_impl<cuda::backward>);
}
#endif

}  // namespace condconv
