// Decode attention straight over the paged KV cache: one query token per sequence, grouped-query heads, no gather.
//
// q `[B, H, D]` (rows may be strided, heads contiguous), caches `[num_blocks, block_size, H_kv, D]`, block table
// `[B, max_blocks]` int64, sequence lengths `[B]` int64 (the token being decoded included) -> out `[B, H, D]`.
// One task per (sequence, KV head): its H / H_kv query heads read each cached K and V row once, scores and the
// output accumulate in float32 (as SDPA's CPU kernel does for bf16), the softmax is exact up to float rounding.
// Built on first use by pdserve/engine/native.py with the machine's own -march; torch's OpenMP pool runs it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, c10::BFloat16* out) { *out = c10::BFloat16(x); }  // round to nearest even

// exp(x) for x <= 0 (softmax after subtracting the max): Cephes' expf, branch-free so the loop vectorizes.
inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

constexpr int64_t kMaxHeads = 64;  // query heads one task holds (H_kv heads' groups, or one group)

// Attention of one sequence's query heads for KV heads [h0, h1): each cached row's K (then V) slice for those heads
// is read once, whole blocks in address order.
template <typename T, int D>
void decode_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* blocks, int64_t len, int64_t group,
                int64_t block_size, int64_t num_kv_heads, int64_t h0, int64_t h1, float scale, float* scores,
                T* out) {
  const int64_t heads = (h1 - h0) * group;  // query heads of this task, rows of `scores` ([heads, len])
  float qf[kMaxHeads][D];
  for (int64_t i = 0; i < heads; ++i)
    for (int d = 0; d < D; ++d) qf[i][d] = to_float(q[i * D + d]) * scale;
  const int64_t row = num_kv_heads * D;  // elements between consecutive slots
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  const int64_t span_bytes = (h1 - h0) * D * static_cast<int64_t>(sizeof(T));  // one row's slice for [h0, h1)
  // Blocks lie anywhere in the cache, so the hardware prefetcher cannot guess the next one: block j + 1's K and V
  // slices are requested while block j computes (the V pass then finds them in cache).
  auto prefetch_block = [&](int64_t j) {
    const int64_t rows = std::min(block_size, len - j * block_size);
    const char* k = reinterpret_cast<const char*>(k_cache + blocks[j] * block_size * row + h0 * D);
    const char* v = reinterpret_cast<const char*>(v_cache + blocks[j] * block_size * row + h0 * D);
    const int64_t row_bytes = row * static_cast<int64_t>(sizeof(T));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t off = 0; off < span_bytes; off += 64) {
        __builtin_prefetch(k + r * row_bytes + off);
        __builtin_prefetch(v + r * row_bytes + off);
      }
  };
  // Visits every cached row's slice for heads [h0, h1) in address order, block by block, as floats:
  // visit(t, h, row_f) with row_f[D] the head's K or V for token t.
  auto for_each_row = [&](const T* cache, bool prefetch, auto&& visit) {
    for (int64_t j = 0; j < num_blocks; ++j) {
      if (prefetch && j + 1 < num_blocks) prefetch_block(j + 1);
      const T* block = cache + blocks[j] * block_size * row;
      const int64_t first = j * block_size, last = std::min(len, first + block_size);
      for (int64_t t = first; t < last; ++t)
        for (int64_t h = h0; h < h1; ++h) {
          const T* x = block + (t - first) * row + h * D;
          float xf[D];
          for (int d = 0; d < D; ++d) xf[d] = to_float(x[d]);
          visit(t, h, xf);
        }
    }
  };
  prefetch_block(0);
  for_each_row(k_cache, true, [&](int64_t t, int64_t h, const float* kf) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t i = (h - h0) * group + g;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int d = 0; d < D; ++d) s += qf[i][d] * kf[d];
      scores[i * len + t] = s;
    }
  });
  float acc[kMaxHeads][D];
  float inv[kMaxHeads];
  for (int64_t i = 0; i < heads; ++i) {
    float* s = scores + i * len;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < len; ++t) m = std::max(m, s[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) {
      s[t] = exp_nonpos(s[t] - m);
      sum += s[t];
    }
    inv[i] = 1.f / sum;
    for (int d = 0; d < D; ++d) acc[i][d] = 0.f;
  }
  for_each_row(v_cache, false, [&](int64_t t, int64_t h, const float* vf) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t i = (h - h0) * group + g;
      const float p = scores[i * len + t];
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[i][d] += p * vf[d];
    }
  });
  for (int64_t i = 0; i < heads; ++i)
    for (int d = 0; d < D; ++d) from_float(acc[i][d] * inv[i], out + i * D + d);
}

template <typename T, int D>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
         const at::Tensor& seq_lens, double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), num_heads = q.size(1);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_table.size(1);
  const int64_t q_row = q.stride(0);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k_cache.const_data_ptr<T>();
  const T* vp = v_cache.const_data_ptr<T>();
  const int64_t* bt = block_table.const_data_ptr<int64_t>();
  const int64_t* lens = seq_lens.const_data_ptr<int64_t>();
  T* op = out.mutable_data_ptr<T>();
  // A task per sequence (whole rows read in order) when there are enough to share the threads; else per KV head.
  const int64_t heads_per_task =
      (batch >= 2 * at::get_num_threads() && num_heads <= kMaxHeads) ? num_kv_heads : 1;
  const int64_t tasks_per_seq = num_kv_heads / heads_per_task;
  at::parallel_for(0, batch * tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / tasks_per_seq, h0 = (i % tasks_per_seq) * heads_per_task, len = lens[b];
      scores.resize(static_cast<size_t>(heads_per_task * group * len));
      decode_one<T, D>(qp + b * q_row + h0 * group * D, kp, vp, bt + b * max_blocks, len, group, block_size,
                       num_kv_heads, h0, h0 + heads_per_task, static_cast<float>(scale), scores.data(),
                       op + (b * num_heads + h0 * group) * D);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q: [B, H, D], heads contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(), "caches: [N, S, H_kv, D]");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.is_contiguous(), "block_table: int64");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.numel() == q.size(0) && seq_lens.is_contiguous(),
              "seq_lens: int64 [B]");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && q.size(1) / k_cache.size(2) <= kMaxHeads, "query heads per KV head");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "dtypes");
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && v_cache.sizes() == k_cache.sizes(), "cache shapes");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == q.size(0), "block_table: [B, max_blocks]");
  // Every read stays inside the cache: lengths fit the table's rows, the rows' blocks exist.
  const int64_t capacity = block_table.size(1) * k_cache.size(1), num_blocks = k_cache.size(0);
  const int64_t* lens = seq_lens.const_data_ptr<int64_t>();
  const int64_t* bt = block_table.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= capacity, "sequence length out of range: ", lens[b]);
    for (int64_t j = 0; j < (lens[b] + k_cache.size(1) - 1) / k_cache.size(1); ++j) {
      const int64_t block = bt[b * block_table.size(1) + j];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block id out of range: ", block);
    }
  }
#define PDSERVE_DISPATCH(T, D) \
  if (head_dim == D) return run<T, D>(q, k_cache, v_cache, block_table, seq_lens, scale, out), out;
  if (q.scalar_type() == at::kBFloat16) {
    PDSERVE_DISPATCH(c10::BFloat16, 32)
    PDSERVE_DISPATCH(c10::BFloat16, 64)
    PDSERVE_DISPATCH(c10::BFloat16, 96)
    PDSERVE_DISPATCH(c10::BFloat16, 128)
  } else if (q.scalar_type() == at::kFloat) {
    PDSERVE_DISPATCH(float, 32)
    PDSERVE_DISPATCH(float, 64)
    PDSERVE_DISPATCH(float, 96)
    PDSERVE_DISPATCH(float, 128)
  }
  TORCH_CHECK(false, "unsupported dtype or head_dim");
}

}  // namespace

TORCH_LIBRARY(pdserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
