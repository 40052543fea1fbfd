// Attention straight over the paged KV cache, no gather: decode rows (one query token per sequence) and prefill
// chunks (many query tokens per sequence, causal over the cached context and themselves).
//
// Decode: q `[B, H, D]` (rows may be strided, heads contiguous), caches `[num_blocks, block_size, H_kv, D]`, block
// table `[B, max_blocks]` int64, sequence lengths `[B]` int64 (the token being decoded included) -> out `[B, H, D]`.
// One task per (sequence, KV head): its H / H_kv query heads read each cached K and V row once, scores and the
// output accumulate in float32 (as SDPA's CPU kernel does for bf16), the softmax is exact up to float rounding. On
// AVX512-BF16 CPUs bf16 scores come from vdpbf16ps, 16 keys at a time (hot 152 -> 85 us, cache-cold 350 -> 160 us
// per layer at 16 x 300 tokens on the 2-core AMD EPYC).
//
// Prefill: q `[T, H, D]` holds every chunk's rows back to back; spans `[S, 3]` int64 say, per chunk, its first row,
// its number of rows and the tokens already cached before it; block tables `[S, max_blocks]`. The chunk's own K/V
// are in the cache already. A flash-attention tiling (online softmax) over (16-64 query positions x one KV head)
// tiles and 32-key tiles, keys only up to the tile's last position: the causal triangle's upper half is never
// computed (torch's CPU flash kernel computes it whenever the keys fit one of its 512-key blocks).
//
// Built on first use by pdserve/engine/native.py with the machine's own -march; torch's OpenMP pool runs it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <iterator>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using pdserve_native::exp_nonpos;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, c10::BFloat16* out) { *out = c10::BFloat16(x); }  // round to nearest even

constexpr int64_t kMaxHeads = 64;  // query heads one task holds (H_kv heads' groups, or one group)

// Attention of one sequence's query heads for KV heads [h0, h1): each cached row's K (then V) slice for those heads
// is read once, whole blocks in address order.
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define PDSERVE_BF16_DOT 1
// Sums of 16 vectors' lanes as one vector (lane i: the sum of v[i]): a transpose-add tree, ~3 ops per sum instead
// of a horizontal reduction each.
inline __m512 reduce16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }  // b[i], 128-bit lane L: lane L's partial sums of v[4i .. 4i + 3]
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
}

// Decode scores in bf16 with vdpbf16ps: scores[i][t] = scale * q_i . k_t for the task's query heads, 16 keys at a
// time (one dot-product vector per key and query head, then reduce16), Q and K as stored, float32 accumulation. Each
// key's slice is loaded once for up to 4 query heads; the next 16 keys' K and V slices are prefetched meanwhile.
template <int D>
void decode_scores_bf16(const c10::BFloat16* q, const c10::BFloat16* k_cache, const c10::BFloat16* v_cache,
                        const int64_t* blocks, int64_t len, int64_t group, int64_t block_size, int64_t num_kv_heads,
                        int64_t h0, int64_t h1, float scale, float* scores) {
  constexpr int kChunks = D / 32;  // 32 bf16 per vector
  const int64_t row = num_kv_heads * D;
  const int64_t span_bytes = (h1 - h0) * D * static_cast<int64_t>(sizeof(c10::BFloat16));
  const __m512 scale_v = _mm512_set1_ps(scale);
  auto slot = [&](int64_t t) { return blocks[t / block_size] * block_size + t % block_size; };
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - t0);
    for (int64_t t = t0 + 16; t < std::min(len, t0 + 32); ++t) {
      const char* k = reinterpret_cast<const char*>(k_cache + slot(t) * row + h0 * D);
      const char* v = reinterpret_cast<const char*>(v_cache + slot(t) * row + h0 * D);
      for (int64_t off = 0; off < span_bytes; off += 64) __builtin_prefetch(k + off), __builtin_prefetch(v + off);
    }
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int64_t gn = std::min<int64_t>(4, group - g0);
        __m512bh qv[4][kChunks];
        for (int64_t g = 0; g < gn; ++g)
          for (int c = 0; c < kChunks; ++c)
            qv[g][c] = (__m512bh)_mm512_loadu_si512(q + ((h - h0) * group + g0 + g) * D + c * 32);
        __m512 v[4][16];
        for (int64_t j = 0; j < n; ++j) {
          const c10::BFloat16* k = k_cache + slot(t0 + j) * row + h * D;
          __m512bh kv[kChunks];
          for (int c = 0; c < kChunks; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(k + c * 32);
          for (int64_t g = 0; g < gn; ++g) {
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < kChunks; ++c) acc = _mm512_dpbf16_ps(acc, qv[g][c], kv[c]);
            v[g][j] = acc;
          }
        }
        for (int64_t g = 0; g < gn; ++g) {
          float* out = scores + ((h - h0) * group + g0 + g) * len + t0;
          if (n == 16) {
            _mm512_storeu_ps(out, _mm512_mul_ps(reduce16(v[g]), scale_v));
          } else {
            for (int64_t j = 0; j < n; ++j) out[j] = _mm512_reduce_add_ps(v[g][j]) * scale;
          }
        }
      }
    }
  }
}
#endif

template <typename T, int D>
void decode_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* blocks, int64_t len, int64_t group,
                int64_t block_size, int64_t num_kv_heads, int64_t h0, int64_t h1, float scale, float* scores,
                T* out, bool bf16_dot) {
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
#ifdef PDSERVE_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_dot) {
      decode_scores_bf16<D>(q, k_cache, v_cache, blocks, len, group, block_size, num_kv_heads, h0, h1, scale, scores);
    }
  }
  if (!(std::is_same_v<T, c10::BFloat16> && bf16_dot))
#endif
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
         const at::Tensor& seq_lens, double scale, bool bf16_dot, at::Tensor& out) {
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
                       op + (b * num_heads + h0 * group) * D, bf16_dot);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, bool bf16_dot) {
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
  if (head_dim == D) return run<T, D>(q, k_cache, v_cache, block_table, seq_lens, scale, bf16_dot, out), out;
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

// ---- prefill ----

using vf = float __attribute__((vector_size(64), aligned(64)));  // 16 floats (two registers on AVX2)
constexpr int kLanes = 16;
// Query positions per task: the most of these that still gives every thread two tasks or more. Larger tiles convert
// each K/V tile once for more rows (2048 rows after 0: 19.3 ms at 16, 15.2 at 64 in bf16); smaller ones balance a
// short chunk (64 rows after 4000: 2.1 ms at 32, 2.4 at 64).
constexpr int64_t kTileQs[] = {64, 32, 16};
constexpr int kTileK = 32;      // keys per inner tile (two vectors)

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

struct PrefillTask {
  int64_t span, first, num_pos, head;  // chunk, first query position in it, positions (<= tile), KV head
  int64_t cost;                        // query rows x keys: the longest tasks start first
};

// A task's scratch: float32 accumulators and, for the bf16 dot-product path, bf16 pairs as 32-bit words.
struct PrefillWork {
  std::vector<float> f;
  std::vector<uint32_t> w;
};

// What a task computes: query positions [pos0, pos0 + num_pos) of a sequence for KV head `h`'s query heads, against
// keys [0, pos0 + num_pos). Rows are position-major: row r is position pos0 + r / group, query head h * group +
// r % group; padded to a multiple of 4 rows (the padding copies the last real row's causal limit, is never written).
struct TaskShape {
  int64_t rows, rows_pad, group, pos0, num_pos;
  int64_t pos(int64_t r) const { return pos0 + std::min(r, rows - 1) / group; }
};

// Scores s [rows_pad][kTileK] of keys t0 .. t0 + nk - 1 (already scaled) become probabilities: masked (causal, or
// past the tile's keys) exactly 0, the rest exp(s - running max); the running max m, the denominator l and the
// accumulator acc [rows_pad][D] are rescaled when the max moves (flash attention's online softmax).
template <int D>
void online_softmax(const TaskShape& shape, int64_t t0, int64_t nk, float* s, float* m, float* l, float* acc) {
  for (int64_t r = 0; r < shape.rows_pad; ++r) {
    const int64_t valid = std::min<int64_t>(nk, shape.pos(r) - t0 + 1);  // keys t0 .. pos of this tile
    float* sr = s + r * kTileK;
    if (valid <= 0) {  // nothing in this tile that the row may see
      for (int64_t j = 0; j < kTileK; ++j) sr[j] = 0.f;
      continue;
    }
    float mx = m[r];
    for (int64_t j = 0; j < valid; ++j) mx = std::max(mx, sr[j]);
    const float corr = exp_nonpos(m[r] - mx);  // m = -inf at first: exp -> ~0, against acc = l = 0
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < kTileK; ++j) {
      const float p = j < valid ? exp_nonpos(sr[j] - mx) : 0.f;
      sr[j] = p;
      sum += p;
    }
    if (mx != m[r]) {
      float* ar = acc + r * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) ar[d] *= corr;
      l[r] *= corr;
    }
    m[r] = mx;
    l[r] += sum;
  }
}

template <typename T, int D>
void write_rows(const TaskShape& shape, const float* acc, const float* l, int64_t h, T* out, int64_t out_row) {
  for (int64_t r = 0; r < shape.rows; ++r) {
    T* dst = out + (r / shape.group) * out_row + (h * shape.group + r % shape.group) * D;
    const float inv = 1.f / l[r];
    for (int d = 0; d < D; ++d) from_float(acc[r * D + d] * inv, dst + d);
  }
}

// Portable path (float32 math, GCC vectors): any dtype, any x86 or Arm.
template <typename T, int D>
void prefill_task(const T* q, int64_t q_row, const T* k_cache, const T* v_cache, const int64_t* blocks,
                  int64_t block_size, int64_t num_kv_heads, int64_t h, const TaskShape& shape, float scale, T* out,
                  int64_t out_row, PrefillWork& work) {
  constexpr int kVecs = D / kLanes;
  const int64_t rows = shape.rows, rows_pad = shape.rows_pad, group = shape.group;
  // qf [rows_pad][D] | acc [rows_pad][D] | s [rows_pad][kTileK] | kt [D][kTileK] | vt [kTileK][D] | m, l [rows_pad]
  work.f.assign(static_cast<size_t>(2 * rows_pad * D + rows_pad * kTileK + 2 * D * kTileK + 2 * rows_pad), 0.f);
  float* qf = work.f.data();
  float* acc = qf + rows_pad * D;
  float* s = acc + rows_pad * D;
  float* kt = s + rows_pad * kTileK;
  float* vt = kt + D * kTileK;
  float* m = vt + kTileK * D;
  float* l = m + rows_pad;
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = q + (r / group) * q_row + (h * group + r % group) * D;
    for (int d = 0; d < D; ++d) qf[r * D + d] = to_float(src[d]) * scale;
  }
  for (int64_t r = 0; r < rows_pad; ++r) m[r] = -std::numeric_limits<float>::infinity();
  const int64_t row = num_kv_heads * D;  // elements between consecutive slots
  const int64_t num_keys = shape.pos0 + shape.num_pos;
  for (int64_t t0 = 0; t0 < num_keys; t0 += kTileK) {
    const int64_t nk = std::min<int64_t>(kTileK, num_keys - t0);
    for (int64_t j = 0; j < kTileK; ++j) {
      if (j < nk) {
        const int64_t t = t0 + j, slot = blocks[t / block_size] * block_size + t % block_size;
        const T* kr = k_cache + slot * row + h * D;
        const T* vr = v_cache + slot * row + h * D;
        for (int d = 0; d < D; ++d) {
          kt[d * kTileK + j] = to_float(kr[d]);
          vt[j * D + d] = to_float(vr[d]);
        }
      } else {
        for (int d = 0; d < D; ++d) kt[d * kTileK + j] = vt[j * D + d] = 0.f;
      }
    }
    // scores s[r][j] = q_r . k_j, four rows at a time
    for (int64_t r = 0; r < rows_pad; r += 4) {
      vf a[4][2] = {};
      for (int d = 0; d < D; ++d) {
        const vf k0 = load(kt + d * kTileK), k1 = load(kt + d * kTileK + kLanes);
        for (int i = 0; i < 4; ++i) {
          const float x = qf[(r + i) * D + d];
          a[i][0] += x * k0, a[i][1] += x * k1;
        }
      }
      for (int i = 0; i < 4; ++i) store(s + (r + i) * kTileK, a[i][0]), store(s + (r + i) * kTileK + kLanes, a[i][1]);
    }
    online_softmax<D>(shape, t0, nk, s, m, l, acc);
    // acc[r] += sum_j p[r][j] v_j, four rows at a time (their probabilities are 0 where masked or skipped)
    for (int64_t r = 0; r < rows_pad; r += 4) {
      if (shape.pos(r + 3) < t0) continue;  // none of these rows sees this tile
      vf a[4][kVecs];
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < kVecs; ++c) a[i][c] = load(acc + (r + i) * D + c * kLanes);
      for (int64_t j = 0; j < nk; ++j) {
        vf vr[kVecs];
        for (int c = 0; c < kVecs; ++c) vr[c] = load(vt + j * D + c * kLanes);
        for (int i = 0; i < 4; ++i) {
          const float p = s[(r + i) * kTileK + j];
          for (int c = 0; c < kVecs; ++c) a[i][c] += p * vr[c];
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < kVecs; ++c) store(acc + (r + i) * D + c * kLanes, a[i][c]);
    }
  }
  write_rows<T, D>(shape, acc, l, h, out, out_row);
}

#ifdef PDSERVE_BF16_DOT
// bf16 on a CPU with AVX512-BF16: both products with vdpbf16ps (a pair of bf16 products per float lane, float32
// accumulation), twice the float32 path's arithmetic per instruction. Q and K enter exactly as stored (the scale is
// applied to the float scores); the probabilities are rounded to bf16 for P.V, as torch's CPU flash kernel does.
template <int D>
void prefill_task_bf16(const c10::BFloat16* q, int64_t q_row, const c10::BFloat16* k_cache,
                       const c10::BFloat16* v_cache, const int64_t* blocks, int64_t block_size, int64_t num_kv_heads,
                       int64_t h, const TaskShape& shape, float scale, c10::BFloat16* out, int64_t out_row,
                       PrefillWork& work) {
  constexpr int kPairs = D / 2, kVecs = D / kLanes, kKeyPairs = kTileK / 2;
  const int64_t rows = shape.rows, rows_pad = shape.rows_pad, group = shape.group;
  // floats: acc [rows_pad][D] | s [rows_pad][kTileK] | m, l [rows_pad]
  work.f.assign(static_cast<size_t>(rows_pad * D + rows_pad * kTileK + 2 * rows_pad), 0.f);
  float* acc = work.f.data();
  float* s = acc + rows_pad * D;
  float* m = s + rows_pad * kTileK;
  float* l = m + rows_pad;
  // words (bf16 pairs): qw [rows_pad][kPairs] (d pairs) | kw [kPairs][kTileK] (d pairs, key-major lanes)
  //                     | vw [kKeyPairs][D] (key pairs, d lanes) | pw [rows_pad][kKeyPairs] (key pairs)
  work.w.assign(static_cast<size_t>(rows_pad * kPairs + kPairs * kTileK + kKeyPairs * D + rows_pad * kKeyPairs), 0u);
  uint32_t* qw = work.w.data();
  uint32_t* kw = qw + rows_pad * kPairs;
  uint32_t* vw = kw + kPairs * kTileK;
  uint32_t* pw = vw + kKeyPairs * D;
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(qw + r * kPairs, q + (r / group) * q_row + (h * group + r % group) * D, D * sizeof(c10::BFloat16));
  for (int64_t r = 0; r < rows_pad; ++r) m[r] = -std::numeric_limits<float>::infinity();
  const int64_t row = num_kv_heads * D;
  const int64_t num_keys = shape.pos0 + shape.num_pos;
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < num_keys; t0 += kTileK) {
    const int64_t nk = std::min<int64_t>(kTileK, num_keys - t0);
    for (int64_t j = 0; j < kTileK; ++j) {
      uint16_t* vh = reinterpret_cast<uint16_t*>(vw) + (j % 2);  // V[j][d] is half (j % 2) of word [j / 2][d]
      if (j < nk) {
        const int64_t t = t0 + j, slot = blocks[t / block_size] * block_size + t % block_size;
        uint32_t kr[kPairs];
        std::memcpy(kr, k_cache + slot * row + h * D, sizeof kr);
        for (int p = 0; p < kPairs; ++p) kw[p * kTileK + j] = kr[p];
        const c10::BFloat16* vr = v_cache + slot * row + h * D;
        for (int d = 0; d < D; ++d) vh[((j / 2) * D + d) * 2] = vr[d].x;
      } else {
        for (int p = 0; p < kPairs; ++p) kw[p * kTileK + j] = 0u;
        for (int d = 0; d < D; ++d) vh[((j / 2) * D + d) * 2] = 0;
      }
    }
    for (int64_t r = 0; r < rows_pad; r += 4) {
      __m512 a[4][2];
      for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
      for (int p = 0; p < kPairs; ++p) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kw + p * kTileK);
        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kw + p * kTileK + kLanes);
        for (int i = 0; i < 4; ++i) {
          const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(qw[(r + i) * kPairs + p]));
          a[i][0] = _mm512_dpbf16_ps(a[i][0], x, k0);
          a[i][1] = _mm512_dpbf16_ps(a[i][1], x, k1);
        }
      }
      for (int i = 0; i < 4; ++i) {
        _mm512_storeu_ps(s + (r + i) * kTileK, _mm512_mul_ps(a[i][0], scale_v));
        _mm512_storeu_ps(s + (r + i) * kTileK + kLanes, _mm512_mul_ps(a[i][1], scale_v));
      }
    }
    online_softmax<D>(shape, t0, nk, s, m, l, acc);
    for (int64_t r = 0; r < rows_pad; ++r) {  // probabilities as bf16 pairs (key 2i, key 2i + 1)
      const __m512bh p = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + r * kTileK + kLanes), _mm512_loadu_ps(s + r * kTileK));
      _mm512_storeu_si512(pw + r * kKeyPairs, (__m512i)p);
    }
    for (int64_t r = 0; r < rows_pad; r += 4) {
      if (shape.pos(r + 3) < t0) continue;  // none of these rows sees this tile
      __m512 a[4][kVecs];
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < kVecs; ++c) a[i][c] = _mm512_loadu_ps(acc + (r + i) * D + c * kLanes);
      for (int64_t jp = 0; jp < (nk + 1) / 2; ++jp) {
        __m512bh vv[kVecs];
        for (int c = 0; c < kVecs; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vw + jp * D + c * kLanes);
        for (int i = 0; i < 4; ++i) {
          const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(pw[(r + i) * kKeyPairs + jp]));
          for (int c = 0; c < kVecs; ++c) a[i][c] = _mm512_dpbf16_ps(a[i][c], x, vv[c]);
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < kVecs; ++c) _mm512_storeu_ps(acc + (r + i) * D + c * kLanes, a[i][c]);
    }
  }
  write_rows<c10::BFloat16, D>(shape, acc, l, h, out, out_row);
}
#endif

template <typename T, int D>
void run_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& block_tables, const at::Tensor& spans, double scale, bool use_bf16_dot,
                 at::Tensor& out) {
  const int64_t num_heads = q.size(1), block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t* sp = spans.const_data_ptr<int64_t>();
  int64_t tile = kTileQs[std::size(kTileQs) - 1];
  for (const int64_t candidate : kTileQs) {
    int64_t num_tasks = 0;
    for (int64_t i = 0; i < spans.size(0); ++i) num_tasks += (sp[i * 3 + 1] + candidate - 1) / candidate * num_kv_heads;
    if (num_tasks >= 2 * at::get_num_threads()) {
      tile = candidate;
      break;
    }
  }
  std::vector<PrefillTask> tasks;
  for (int64_t i = 0; i < spans.size(0); ++i) {
    const int64_t n = sp[i * 3 + 1], context = sp[i * 3 + 2];
    for (int64_t first = 0; first < n; first += tile) {
      const int64_t num_pos = std::min(tile, n - first);
      for (int64_t h = 0; h < num_kv_heads; ++h)
        tasks.push_back({i, first, num_pos, h, num_pos * (context + first + num_pos)});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const auto& a, const auto& b) { return a.cost > b.cost; });
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k_cache.const_data_ptr<T>();
  const T* vp = v_cache.const_data_ptr<T>();
  const int64_t* bt = block_tables.const_data_ptr<int64_t>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t q_row = q.stride(0), out_row = out.stride(0);
  // Tasks are taken one at a time from a shared counter, longest first: a thread that is preempted (a 2-core box
  // also runs the HTTP side) holds up one task, not a fixed half of the work.
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size()));
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    PrefillWork work;
    for (size_t i = next.fetch_add(1); i < tasks.size(); i = next.fetch_add(1)) {
      const PrefillTask& t = tasks[i];
      const int64_t start = sp[t.span * 3], context = sp[t.span * 3 + 2];
      const int64_t rows = t.num_pos * group;
      const TaskShape shape{rows, (rows + 3) / 4 * 4, group, context + t.first, t.num_pos};
      const T* task_q = qp + (start + t.first) * q_row;
      T* task_out = op + (start + t.first) * out_row;
      const int64_t* blocks = bt + t.span * max_blocks;
#ifdef PDSERVE_BF16_DOT
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (use_bf16_dot) {
          prefill_task_bf16<D>(task_q, q_row, kp, vp, blocks, block_size, num_kv_heads, t.head, shape,
                               static_cast<float>(scale), task_out, out_row, work);
          continue;
        }
      }
#endif
      prefill_task<T, D>(task_q, q_row, kp, vp, blocks, block_size, num_kv_heads, t.head, shape,
                         static_cast<float>(scale), task_out, out_row, work);
    }
  });
}

at::Tensor paged_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& spans, double scale, bool bf16_dot) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q: [T, H, D], heads contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(), "caches: [N, S, H_kv, D]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && k_cache.size(3) == q.size(2), "cache shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && q.size(1) / k_cache.size(2) <= kMaxHeads, "query heads per KV head");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "dtypes");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "block_tables: int64 [S, max_blocks]");
  TORCH_CHECK(spans.scalar_type() == at::kLong && spans.dim() == 2 && spans.size(1) == 3 && spans.is_contiguous() &&
                  spans.size(0) == block_tables.size(0),
              "spans: int64 [S, 3] (first row, rows, cached tokens before), one per block table row");
  // The spans tile q's rows exactly (every output row is written once) and every key read stays in the cache.
  const int64_t* sp = spans.const_data_ptr<int64_t>();
  const int64_t* bt = block_tables.const_data_ptr<int64_t>();
  const int64_t block_size = k_cache.size(1), capacity = block_tables.size(1) * block_size;
  int64_t row = 0;
  for (int64_t i = 0; i < spans.size(0); ++i) {
    const int64_t start = sp[i * 3], n = sp[i * 3 + 1], context = sp[i * 3 + 2];
    TORCH_CHECK(start == row && n >= 1 && context >= 0, "spans must tile q's rows in order, each >= 1 row");
    TORCH_CHECK(context + n <= capacity, "span longer than its block table: ", context + n);
    for (int64_t j = 0; j < (context + n + block_size - 1) / block_size; ++j) {
      const int64_t block = bt[i * block_tables.size(1) + j];
      TORCH_CHECK(block >= 0 && block < k_cache.size(0), "block id out of range: ", block);
    }
    row += n;
  }
  TORCH_CHECK(row == q.size(0), "spans cover ", row, " rows of ", q.size(0));
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const int64_t head_dim = q.size(2);
#define PDSERVE_DISPATCH_PREFILL(T, D) \
  if (head_dim == D) return run_prefill<T, D>(q, k_cache, v_cache, block_tables, spans, scale, bf16_dot, out), out;
  if (q.scalar_type() == at::kBFloat16) {
    PDSERVE_DISPATCH_PREFILL(c10::BFloat16, 32)
    PDSERVE_DISPATCH_PREFILL(c10::BFloat16, 64)
    PDSERVE_DISPATCH_PREFILL(c10::BFloat16, 96)
    PDSERVE_DISPATCH_PREFILL(c10::BFloat16, 128)
  } else if (q.scalar_type() == at::kFloat) {
    PDSERVE_DISPATCH_PREFILL(float, 32)
    PDSERVE_DISPATCH_PREFILL(float, 64)
    PDSERVE_DISPATCH_PREFILL(float, 96)
    PDSERVE_DISPATCH_PREFILL(float, 128)
  }
  TORCH_CHECK(false, "unsupported dtype or head_dim");
}


}  // namespace

TORCH_LIBRARY(pdserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, float scale, bool bf16_dot=True) -> Tensor");
  m.def("paged_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor spans, float scale, bool bf16_dot=True) -> Tensor");
}
TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("paged_prefill", &paged_prefill);
}
