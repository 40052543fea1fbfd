// The elementwise glue of a Llama layer as one op each, for bf16 on CPU. At a decode step's size (16 rows x 576)
// each torch op costs a few microseconds of dispatch and allocation and does almost no work; SmolLM2's layer ran
// ~26 of them (RMSNorm alone is 8: to float, pow, mean, add, rsqrt, mul, to bf16, mul), ~3 ms of a 19 ms step.
//
// Each op rounds to bf16 where the torch sequence it replaces does (model.py's rms_norm, apply_rope, silu * up, the
// residual add), so results equal torch's except where a float32 reduction or exp (Cephes' here, Sleef's in torch)
// lands differently in its last bit just at a bf16 rounding boundary. Rows may be strided (the model's fused projections leave them so); the last dim is
// contiguous.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "vec_math.h"

#include <cmath>
#include <cstdint>

namespace {

using bf16 = uint16_t;  // bf16 bits: the data of a c10::BFloat16 tensor, converted branch-free
using pdserve_native::exp_nonneg;
using pdserve_native::exp_nonpos;
using pdserve_native::round_bf16;

inline float f(bf16 x) { return pdserve_native::bf16_to_float(x); }
inline bf16 to_bf16(float x) { return pdserve_native::float_to_bf16(x); }
const bf16* bits(const at::Tensor& t) {
  return reinterpret_cast<const bf16*>(t.const_data_ptr<c10::BFloat16>());
}
bf16* mutable_bits(at::Tensor& t) { return reinterpret_cast<bf16*>(t.mutable_data_ptr<c10::BFloat16>()); }

// Rows of `width` elements per parallel task: enough work per task to be worth a thread (at::parallel_for runs the
// range inline when it is within one grain).
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, name, ": bf16");
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1, name, ": last dim contiguous");
}

// The rows of x as [rows, width] with a row stride: x must be a (strided) stack of contiguous rows.
int64_t row_stride(const at::Tensor& x) {
  if (x.dim() == 1) return x.size(0);
  for (int64_t d = 0; d + 2 < x.dim(); ++d)
    TORCH_CHECK(x.stride(d) == x.stride(d + 1) * x.size(d + 1), "only the row stride may differ from contiguous");
  return x.stride(-2);
}

// out = weight * bf16(x * rsqrt(mean(x^2) + eps)), the variance in float32 (transformers' LlamaRMSNorm).
void norm_row(const bf16* x, const bf16* w, int64_t width, float eps, bf16* out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < width; ++d) sum += f(x[d]) * f(x[d]);
  const float r = 1.f / std::sqrt(sum / static_cast<float>(width) + eps);
  for (int64_t d = 0; d < width; ++d) out[d] = to_bf16(f(w[d]) * round_bf16(f(x[d]) * r));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(x.is_contiguous(), "x: contiguous");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 1 && weight.is_contiguous() &&
                  weight.size(0) == x.size(-1),
              "weight: bf16 [width]");
  const int64_t width = x.size(-1), rows = x.numel() / std::max<int64_t>(width, 1);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const bf16* xp = bits(x);
  const bf16* wp = bits(weight);
  bf16* op = mutable_bits(out);
  at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xp + r * width, wp, width, static_cast<float>(eps), op + r * width);
  });
  return out;
}

// x += delta (rounded to bf16, as torch's in-place add), then rms_norm(x): the residual stream and the next norm.
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(delta, "delta");
  TORCH_CHECK(x.is_contiguous() && delta.sizes() == x.sizes(), "x: contiguous; delta: x's shape");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 1 && weight.is_contiguous() &&
                  weight.size(0) == x.size(-1),
              "weight: bf16 [width]");
  const int64_t width = x.size(-1), rows = x.numel() / std::max<int64_t>(width, 1), delta_row = row_stride(delta);
  at::Tensor out = at::empty(x.sizes(), x.options());
  bf16* xp = mutable_bits(x);
  const bf16* dp = bits(delta);
  const bf16* wp = bits(weight);
  bf16* op = mutable_bits(out);
  at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      bf16* xr = xp + r * width;
      const bf16* dr = dp + r * delta_row;
      for (int64_t d = 0; d < width; ++d) xr[d] = to_bf16(f(xr[d]) + f(dr[d]));
      norm_row(xr, wp, width, static_cast<float>(eps), op + r * width);
    }
  });
  return out;
}

// Rotary embedding of x [T, heads, D] with cos, sin [T, D] (rotate-half): bf16(bf16(x * cos) + bf16(rot(x) * sin)),
// rot(x) = cat(-x[D/2:], x[:D/2]) — the three roundings of model.py's apply_rope.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(1) == x.size(2), "x: [T, heads, D], heads contiguous");
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16, "cos, sin: bf16");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() &&
                  cos.size(0) == x.size(0) && cos.size(1) == x.size(2),
              "cos, sin: [T, D]");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2, x_row = x.stride(0);
  TORCH_CHECK(dim % 2 == 0, "head dim must be even");
  at::Tensor out = at::empty({tokens, heads, dim}, x.options());
  const bf16* xp = bits(x);
  const bf16* cp = bits(cos);
  const bf16* sp = bits(sin);
  bf16* op = mutable_bits(out);
  at::parallel_for(0, tokens, grain_rows(heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bf16* c = cp + t * dim;
      const bf16* s = sp + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        const bf16* xr = xp + t * x_row + h * dim;
        bf16* o = op + (t * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const float rot = d < half ? -f(xr[d + half]) : f(xr[d - half]);
          o[d] = to_bf16(round_bf16(f(xr[d]) * f(c[d])) + round_bf16(rot * f(s[d])));
        }
      }
    }
  });
  return out;
}

// [T, 2I] (gate | up) -> [T, I]: bf16(bf16(silu(gate)) * up), as F.silu then mul_ in bf16.
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x: [T, 2 * intermediate]");
  const int64_t tokens = x.size(0), inter = x.size(1) / 2, x_row = x.stride(0);
  at::Tensor out = at::empty({tokens, inter}, x.options());
  const bf16* xp = bits(x);
  bf16* op = mutable_bits(out);
  at::parallel_for(0, tokens, grain_rows(2 * inter), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bf16* g = xp + t * x_row;
      const bf16* u = g + inter;
      bf16* o = op + t * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float gi = f(g[i]);
        const float exp_neg = gi >= 0.f ? exp_nonpos(-gi) : exp_nonneg(-gi);  // exp(-g), inf past ~88.7
        o[i] = to_bf16(round_bf16(gi / (1.f + exp_neg)) * f(u[i]));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("rope", &rope);
  m.impl("silu_and_mul", &silu_and_mul);
}
