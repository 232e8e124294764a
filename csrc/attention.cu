// Split-KV decode/verification attention over a static KV cache, with the append of the new tokens fused in.
//
// Semantics are flash_attn_with_kvcache's (rotary_interleaved=False): the Tq new keys are rotated (HF half
// rotation) and written with their values at cache_seqlens[b] + [0, Tq); the rotated queries attend over
// [0, cache_seqlens[b] + Tq) with bottom-right-aligned causality among the new tokens.
//
// Launch structure (two kernels, one when num_splits == 1):
//   attention_split_kernel  grid (num_splits, row_tiles * hkv, batch), 128 threads.
//     One CTA owns one KV head of one sequence, one slice of the key range ("split") and up to kRowTile
//     query rows. Rows are (t, head-in-group) pairs, so all query heads of a GQA group share every K/V load.
//     The split plan comes from the cache capacity, not the live length: a captured CUDA graph replays the
//     same grid for any length, and splits past the live length exit after writing an empty partial.
//     Keys stream through shared memory in chunks with a two-stage cp.async pipeline. Chunk rows past the
//     committed length are zero-filled; the chunk that holds the new positions gets them from k/v (rotated),
//     and row tile 0 also stores them into the cache. The new tokens therefore see themselves without a
//     separate append launch, and exactly one CTA writes each new cache row.
//     Per chunk: scores (lane groups of head_dim/VEC threads per key, one 16-byte vector per lane, group
//     shuffles) -> online softmax (one warp per row, base-2 exponent) -> P.V (each thread owns two output
//     columns for all rows, over a quarter or half of the chunk's keys).
//   attention_combine_kernel  grid (batch * tq * hq), head_dim threads: merges the per-split partials with
//     their log-sum-exps.
#include <algorithm>
#include <array>

#include "common.cuh"

namespace spd {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRowTile = 32;  // query rows per CTA; more rows (long verification or prefill) use more row tiles

template <typename T, int HEAD_DIM>
struct AttentionConfig {
  static constexpr int kHalf = HEAD_DIM / 2;
  static constexpr int kVec = 16 / sizeof(T);                 // elements per 16-byte vector
  static constexpr int kChunk = sizeof(T) == 4 ? 32 : 64;     // keys per chunk: 16 KiB of K per stage at D=128
  static constexpr int kLanesPerKey = HEAD_DIM / kVec;        // score pass: lanes sharing one key
  static constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  static constexpr int kPvColumnThreads = HEAD_DIM / 2;       // P.V pass: each thread owns two columns
  static constexpr int kPvKeyLanes = kThreads / kPvColumnThreads;
  static constexpr int kPvKeysPerLane = kChunk / kPvKeyLanes;

  static_assert(HEAD_DIM % (2 * kVec) == 0 && kLanesPerKey <= 32, "head_dim must be a multiple of 2 vectors");
  static_assert(kChunk % (kWarps * kKeysPerWarp) == 0, "score pass must tile the chunk");
  static_assert(kChunk % 32 == 0, "softmax pass reads whole warps of scores");
  static_assert(kThreads % kPvColumnThreads == 0 && kPvKeysPerLane % 4 == 0, "P.V pass tiling");
  static_assert(kPvColumnThreads % 32 == 0, "P.V key lanes must be warp-uniform (broadcast reads of P)");

  // Shared memory: fp32 q tile and scores, per-row softmax state, two stages of K and V chunks. After the
  // main loop the K/V stages are reused to sum the P.V partials of the key lanes.
  static constexpr size_t kFloatWords = kRowTile * HEAD_DIM + kRowTile * kChunk + 3 * kRowTile;
  static constexpr size_t kStageBytes = 2 * 2 * kChunk * HEAD_DIM * sizeof(T);
  static constexpr size_t kReduceBytes = (kPvKeyLanes - 1) * kRowTile * HEAD_DIM * sizeof(float);
  static_assert(kFloatWords * sizeof(float) % 16 == 0, "K/V stages must stay 16-byte aligned");
  static_assert(kReduceBytes <= kStageBytes, "key-lane reduction reuses the K/V stages");
  static constexpr size_t kSmemBytes = kFloatWords * sizeof(float) + kStageBytes;
};

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(const AttentionArgs args) {
  using Cfg = AttentionConfig<T, HEAD_DIM>;
  constexpr int D = HEAD_DIM;
  constexpr int kHalf = Cfg::kHalf;
  constexpr int kVec = Cfg::kVec;
  constexpr int kChunk = Cfg::kChunk;

  extern __shared__ float4 smem_raw[];
  float* q_s = reinterpret_cast<float*>(smem_raw);  // [kRowTile][D], rotated, unscaled
  float* p_s = q_s + kRowTile * D;                   // [kRowTile][kChunk], scores then probabilities
  float* row_max = p_s + kRowTile * kChunk;          // running max (log2 domain)
  float* row_sum = row_max + kRowTile;               // running denominator
  float* row_alpha = row_sum + kRowTile;             // rescale factor of the current chunk
  T* k_s = reinterpret_cast<T*>(row_alpha + kRowTile);  // [2][kChunk][D]
  T* v_s = k_s + 2 * kChunk * D;                        // [2][kChunk][D]
  __shared__ int row_limit[kRowTile];                   // first invisible key position of each row

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y % args.hkv;
  const int row_tile = blockIdx.y / args.hkv;
  const int b = blockIdx.z;
  const int group = args.hq / args.hkv;
  const int row_begin = row_tile * kRowTile;
  const int rows = min(kRowTile, args.tq * group - row_begin);
  const int seqlen = args.cache_seqlens[b];
  const int split_begin = split * args.split_len;
  const int split_end = min(split_begin + args.split_len, args.s_max);
  const int last_row_t = (row_begin + rows - 1) / group;
  // Row tile 0 writes the new K/V, so it visits every new position; other tiles stop at their causal horizon.
  const int kv_end = (args.causal && row_tile > 0) ? seqlen + last_row_t + 1 : seqlen + args.tq;
  const int loop_end = min(split_end, kv_end);
  const int num_chunks = loop_end > split_begin ? (loop_end - split_begin + kChunk - 1) / kChunk : 0;
  const bool writes_new_kv = row_tile == 0;
  const float scale_log2 = args.softmax_scale * 1.4426950408889634f;

  const T* q = static_cast<const T*>(args.q);
  T* k_cache = static_cast<T*>(args.k_cache) + b * args.k_cache_stride[0] + kv_head * args.k_cache_stride[2];
  T* v_cache = static_cast<T*>(args.v_cache) + b * args.v_cache_stride[0] + kv_head * args.v_cache_stride[2];
  const T* k_new = static_cast<const T*>(args.k_new) + b * args.k_new_stride[0] + kv_head * args.k_new_stride[2];
  const T* v_new = static_cast<const T*>(args.v_new) + b * args.v_new_stride[0] + kv_head * args.v_new_stride[2];
  auto row_t = [&](int r) { return (row_begin + r) / group; };
  auto row_head = [&](int r) { return kv_head * group + (row_begin + r) % group; };

  // Rotated queries in fp32; the softmax scale is applied to the scores.
  for (int i = threadIdx.x; i < rows * kHalf; i += kThreads) {
    const int r = i / kHalf, d = i % kHalf, t = row_t(r);
    const T* q_row = q + b * args.q_stride[0] + t * args.q_stride[1] + row_head(r) * args.q_stride[2];
    const float2 x = load_rotated_pair(q_row, d, kHalf, args.rotary, seqlen + t);
    q_s[r * D + d] = x.x;
    q_s[r * D + d + kHalf] = x.y;
  }
  if (threadIdx.x < kRowTile) {
    const int r = threadIdx.x;
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
    row_limit[r] = min(loop_end, args.causal ? seqlen + row_t(r) + 1 : kv_end);
  }

  // Committed cache rows of a chunk come in by cp.async; everything else is zero-filled.
  auto issue_chunk_load = [&](int chunk, int stage) {
    const int chunk_begin = split_begin + chunk * kChunk;
    const int cached_end = min(seqlen, loop_end);
    T* ks = k_s + stage * kChunk * D;
    T* vs = v_s + stage * kChunk * D;
    for (int i = threadIdx.x; i < kChunk * (D / kVec); i += kThreads) {
      const int n = i / (D / kVec), col = (i % (D / kVec)) * kVec;
      const int pos = chunk_begin + n;
      const bool from_cache = pos < cached_end;
      const int64_t src_pos = from_cache ? pos : 0;
      cp_async_16(ks + n * D + col, k_cache + src_pos * args.k_cache_stride[1] + col, from_cache);
      cp_async_16(vs + n * D + col, v_cache + src_pos * args.v_cache_stride[1] + col, from_cache);
    }
    cp_async_commit();
  };

  // The new tokens' rows of a chunk: rotate k, round to the cache dtype (what later steps will read back),
  // place in shared memory, and store into the cache from row tile 0. Returns whether the chunk had any.
  auto insert_new_tokens = [&](int chunk, int stage) {
    const int chunk_begin = split_begin + chunk * kChunk;
    const int new_begin = max(chunk_begin, seqlen);
    const int new_end = min(chunk_begin + kChunk, loop_end);
    if (new_begin >= new_end) return false;
    T* ks = k_s + stage * kChunk * D;
    T* vs = v_s + stage * kChunk * D;
    for (int i = threadIdx.x; i < (new_end - new_begin) * kHalf; i += kThreads) {
      const int pos = new_begin + i / kHalf, d = i % kHalf, n = pos - chunk_begin, t = pos - seqlen;
      const float2 k_rot = load_rotated_pair(k_new + t * args.k_new_stride[1], d, kHalf, args.rotary, pos);
      const T k1 = from_float<T>(k_rot.x), k2 = from_float<T>(k_rot.y);
      const T v1 = v_new[t * args.v_new_stride[1] + d], v2 = v_new[t * args.v_new_stride[1] + d + kHalf];
      ks[n * D + d] = k1;
      ks[n * D + d + kHalf] = k2;
      vs[n * D + d] = v1;
      vs[n * D + d + kHalf] = v2;
      if (writes_new_kv) {
        T* k_row = k_cache + static_cast<int64_t>(pos) * args.k_cache_stride[1];
        T* v_row = v_cache + static_cast<int64_t>(pos) * args.v_cache_stride[1];
        k_row[d] = k1;
        k_row[d + kHalf] = k2;
        v_row[d] = v1;
        v_row[d + kHalf] = v2;
      }
    }
    return true;
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int pv_col = (threadIdx.x % Cfg::kPvColumnThreads) * 2;
  const int pv_key_lane = threadIdx.x / Cfg::kPvColumnThreads;
  float acc[kRowTile][2];
#pragma unroll
  for (int r = 0; r < kRowTile; ++r) acc[r][0] = acc[r][1] = 0.f;

  __syncthreads();  // q_s and the row state are ready
  if (num_chunks > 0) issue_chunk_load(0, 0);
  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    const int stage = chunk & 1;
    const int chunk_begin = split_begin + chunk * kChunk;
    if (chunk + 1 < num_chunks) {
      issue_chunk_load(chunk + 1, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (insert_new_tokens(chunk, stage)) __syncthreads();  // uniform: every thread sees the same bounds

    // Scores: kLanesPerKey lanes hold one 16-byte slice of a key each; partial dot products meet in shuffles.
    {
      const T* ks = k_s + stage * kChunk * D;
      const int col = (lane % Cfg::kLanesPerKey) * kVec;
      for (int n0 = warp * Cfg::kKeysPerWarp; n0 < kChunk; n0 += kWarps * Cfg::kKeysPerWarp) {
        const int n = n0 + lane / Cfg::kLanesPerKey;
        const Vec<T, kVec> key = *reinterpret_cast<const Vec<T, kVec>*>(ks + n * D + col);
        float k_f[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) k_f[e] = to_float(key.v[e]);
        const int pos = chunk_begin + n;
        for (int r = 0; r < rows; ++r) {
          const float4* q4 = reinterpret_cast<const float4*>(q_s + r * D + col);
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < kVec / 4; ++e) {
            const float4 qv = q4[e];
            dot += qv.x * k_f[4 * e] + qv.y * k_f[4 * e + 1] + qv.z * k_f[4 * e + 2] + qv.w * k_f[4 * e + 3];
          }
          dot = group_sum<Cfg::kLanesPerKey>(dot);
          if (lane % Cfg::kLanesPerKey == 0) p_s[r * kChunk + n] = pos < row_limit[r] ? dot * scale_log2 : -INFINITY;
        }
      }
    }
    __syncthreads();

    // Online softmax, one warp per row. A row with nothing visible yet keeps max -inf; m_use = 0 then makes
    // its probabilities exp2(-inf) = 0 instead of NaN.
    for (int r = warp; r < rows; r += kWarps) {
      float s[kChunk / 32];
      float chunk_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < kChunk / 32; ++i) {
        s[i] = p_s[r * kChunk + lane + 32 * i];
        chunk_max = fmaxf(chunk_max, s[i]);
      }
      chunk_max = group_max<32>(chunk_max);
      const float m_old = row_max[r];
      const float m_new = fmaxf(m_old, chunk_max);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kChunk / 32; ++i) {
        const float p = exp2f(s[i] - m_use);
        p_s[r * kChunk + lane + 32 * i] = p;
        sum += p;
      }
      sum = group_sum<32>(sum);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);
        row_alpha[r] = alpha;
        row_sum[r] = row_sum[r] * alpha + sum;
        row_max[r] = m_new;
      }
    }
    __syncthreads();

    // P.V: two columns per thread for every row, over this key lane's share of the chunk, four keys at a time
    // so each row's probabilities come in as one broadcast float4.
    {
      const T* vs = v_s + stage * kChunk * D;
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) {
        if (r < rows) {
          const float alpha = row_alpha[r];
          acc[r][0] *= alpha;
          acc[r][1] *= alpha;
        }
      }
      const int key_begin = pv_key_lane * Cfg::kPvKeysPerLane;
      for (int n = key_begin; n < key_begin + Cfg::kPvKeysPerLane; n += 4) {
        float v0[4], v1[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const Vec<T, 2> pair = *reinterpret_cast<const Vec<T, 2>*>(vs + (n + e) * D + pv_col);
          v0[e] = to_float(pair.v[0]);
          v1[e] = to_float(pair.v[1]);
        }
#pragma unroll
        for (int r = 0; r < kRowTile; ++r) {
          if (r < rows) {
            const float4 p = *reinterpret_cast<const float4*>(p_s + r * kChunk + n);
            acc[r][0] += p.x * v0[0] + p.y * v0[1] + p.z * v0[2] + p.w * v0[3];
            acc[r][1] += p.x * v1[0] + p.y * v1[1] + p.z * v1[2] + p.w * v1[3];
          }
        }
      }
    }
    __syncthreads();  // the next iteration refills this stage and p_s
  }

  // Sum the key lanes' partial P.V through the (now idle) K/V stages.
  float* reduce_s = reinterpret_cast<float*>(k_s);  // [kPvKeyLanes - 1][kRowTile][D]
  if (pv_key_lane > 0) {
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      if (r < rows) {
        float* dst = reduce_s + ((pv_key_lane - 1) * kRowTile + r) * D + pv_col;
        dst[0] = acc[r][0];
        dst[1] = acc[r][1];
      }
    }
  }
  __syncthreads();
  if (pv_key_lane == 0) {
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      if (r < rows) {
        float o0 = acc[r][0], o1 = acc[r][1];
        for (int lane_id = 1; lane_id < Cfg::kPvKeyLanes; ++lane_id) {
          const float* src = reduce_s + ((lane_id - 1) * kRowTile + r) * D + pv_col;
          o0 += src[0];
          o1 += src[1];
        }
        const float l = row_sum[r];
        const float inv_l = l > 0.f ? 1.f / l : 0.f;  // an empty split contributes zeros with lse = -inf
        const int t = row_t(r), head = row_head(r);
        if (args.num_splits == 1) {
          Vec<T, 2> o;
          o.v[0] = from_float<T>(o0 * inv_l);
          o.v[1] = from_float<T>(o1 * inv_l);
          T* out = static_cast<T*>(args.out) + b * args.out_stride[0] + t * args.out_stride[1] +
                   head * args.out_stride[2] + pv_col;
          *reinterpret_cast<Vec<T, 2>*>(out) = o;
        } else {
          const int64_t row = ((static_cast<int64_t>(split) * args.batch + b) * args.tq + t) * args.hq + head;
          float2* out = reinterpret_cast<float2*>(args.partial_out + row * D + pv_col);
          *out = make_float2(o0 * inv_l, o1 * inv_l);
        }
      }
    }
  }
  if (args.num_splits > 1 && threadIdx.x < rows) {
    const int r = threadIdx.x;
    const int64_t row =
        ((static_cast<int64_t>(split) * args.batch + b) * args.tq + row_t(r)) * args.hq + row_head(r);
    const float l = row_sum[r];
    args.partial_lse[row] = l > 0.f ? row_max[r] + log2f(l) : -INFINITY;
  }
}

// Merges the splits of one (b, t, head) row: out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max).
// Split 0 always holds key 0, which every row sees, so the max is finite.
template <typename T>
__global__ void attention_combine_kernel(const AttentionArgs args) {
  const int64_t rows_total = static_cast<int64_t>(args.batch) * args.tq * args.hq;
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x;
  float max_lse = -INFINITY;
  for (int s = 0; s < args.num_splits; ++s) max_lse = fmaxf(max_lse, args.partial_lse[s * rows_total + row]);
  float numerator = 0.f, denominator = 0.f;
  for (int s = 0; s < args.num_splits; ++s) {
    const float w = exp2f(args.partial_lse[s * rows_total + row] - max_lse);
    numerator += w * args.partial_out[(s * rows_total + row) * args.head_dim + d];
    denominator += w;
  }
  const int head = row % args.hq;
  const int t = (row / args.hq) % args.tq;
  const int b = row / (static_cast<int64_t>(args.hq) * args.tq);
  T* out = static_cast<T*>(args.out) + b * args.out_stride[0] + t * args.out_stride[1] + head * args.out_stride[2];
  out[d] = from_float<T>(numerator / denominator);
}

template <typename T, int HEAD_DIM>
void launch_attention(const AttentionArgs& args, int device, cudaStream_t stream) {
  using Cfg = AttentionConfig<T, HEAD_DIM>;
  auto* kernel = attention_split_kernel<T, HEAD_DIM>;
  // Opting in to more than 48 KiB of dynamic shared memory is per device; do it once, before any capture.
  static std::array<bool, 64> configured{};
  if (device < 0 || device >= static_cast<int>(configured.size()) || !configured[device]) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(Cfg::kSmemBytes)),
               "cudaFuncSetAttribute(attention_split_kernel)");
    if (device >= 0 && device < static_cast<int>(configured.size())) configured[device] = true;
  }
  const int row_tiles = (args.tq * (args.hq / args.hkv) + kRowTile - 1) / kRowTile;
  const dim3 grid(args.num_splits, row_tiles * args.hkv, args.batch);
  kernel<<<grid, kThreads, Cfg::kSmemBytes, stream>>>(args);
  check_launch("attention_split_kernel");
  if (args.num_splits > 1) {
    attention_combine_kernel<T><<<args.batch * args.tq * args.hq, HEAD_DIM, 0, stream>>>(args);
    check_launch("attention_combine_kernel");
  }
}

}  // namespace

int attention_chunk_keys(DType dtype) {
  int chunk = 0;
  dispatch_float_type(dtype, [&](auto tag) { chunk = AttentionConfig<decltype(tag), 64>::kChunk; });
  return chunk;
}
int attention_rows_per_cta() { return kRowTile; }

void attention_with_kvcache(const AttentionArgs& args, DType dtype, int device, cudaStream_t stream) {
  if (args.hkv <= 0 || args.hq % args.hkv != 0) throw std::invalid_argument("hq must be a multiple of hkv");
  if (args.num_splits < 1 || args.split_len < 1) throw std::invalid_argument("need num_splits >= 1, split_len >= 1");
  if (static_cast<int64_t>(args.num_splits) * args.split_len < args.s_max) {
    throw std::invalid_argument("the splits must cover the whole cache capacity");
  }
  if (args.batch == 0 || args.tq == 0) return;
  DeviceGuard guard(device);
  dispatch_float_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (args.head_dim) {
      case 64: launch_attention<T, 64>(args, device, stream); return;
      case 128: launch_attention<T, 128>(args, device, stream); return;
      default: throw std::invalid_argument("attention_with_kvcache supports head_dim 64 and 128");
    }
  });
}

}  // namespace spd
