// Host-side interface of the spd-engine CUDA kernels: argument structs and launchers, shared by the .cu files
// and the pybind11 bindings. Plain C++ (no device code), so bindings.cpp compiles with the host compiler.
//
// Conventions: tensors are raw device pointers; strides are in elements, for the listed leading dimensions,
// and the last dimension is always contiguous; every launcher enqueues on `stream` and returns at once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace spd {

// Must match DTYPE_CODES in spd_engine/ops/cuda_backend.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// cos/sin tables of shape (len, head_dim / 2), rows indexed by absolute position; len == 0 means no rotary.
struct RotaryTable {
  const void* cos = nullptr;
  const void* sin = nullptr;
  DType dtype = DType::kFloat32;
  int64_t row_stride = 0;
  int len = 0;
};

// Split-KV decode attention with the KV-cache append fused in (flash_attn_with_kvcache semantics).
// q/k_new/v_new/out are (batch, tq, heads, head_dim) with strides for (batch, t, head); the caches are
// (batch, s_max, hkv, head_dim) with strides for (batch, position, head). partial_out / partial_lse are fp32
// scratch of num_splits * batch * tq * hq * head_dim and num_splits * batch * tq * hq elements; they are
// only touched when num_splits > 1.
struct AttentionArgs {
  const void* q = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  const int32_t* cache_seqlens = nullptr;
  void* out = nullptr;
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
  int64_t q_stride[3] = {};
  int64_t k_cache_stride[3] = {};
  int64_t v_cache_stride[3] = {};
  int64_t k_new_stride[3] = {};
  int64_t v_new_stride[3] = {};
  int64_t out_stride[3] = {};
  RotaryTable rotary;
  int batch = 0, tq = 0, hq = 0, hkv = 0, head_dim = 0, s_max = 0;
  float softmax_scale = 0.f;
  bool causal = true;
  int num_splits = 1;  // planned from capacity by the caller so a captured CUDA graph stays valid
  int split_len = 0;   // keys per split: split i covers [i * split_len, min((i + 1) * split_len, s_max))
};

void attention_with_kvcache(const AttentionArgs& args, DType dtype, int device, cudaStream_t stream);

// Keys per shared-memory chunk and query rows per CTA of the attention kernel (the caller plans splits
// in whole chunks and sizes nothing else from these).
int attention_chunk_keys(DType dtype);
int attention_rows_per_cta();

// Rotates k (HF half rotation) and writes k, v at cache_seqlens[b] + [0, tq); positions past s_max are dropped.
struct AppendKVArgs {
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  const int32_t* cache_seqlens = nullptr;
  int64_t k_cache_stride[3] = {};
  int64_t v_cache_stride[3] = {};
  int64_t k_new_stride[3] = {};
  int64_t v_new_stride[3] = {};
  RotaryTable rotary;
  int batch = 0, tq = 0, hkv = 0, head_dim = 0, s_max = 0;
};

void append_kv_cache(const AppendKVArgs& args, DType dtype, int device, cudaStream_t stream);

// normed = weight * rms_norm(x + residual); new_residual = x + residual (rounded to x's dtype, as HF does).
// residual / residual_out are null when there is no residual. out has weight_dtype when that is fp32, else
// x's dtype (torch's type promotion for weight * normed).
struct RmsNormArgs {
  const void* x = nullptr;
  const void* residual = nullptr;
  const void* weight = nullptr;
  void* out = nullptr;
  void* residual_out = nullptr;
  int64_t rows = 0;
  int hidden = 0;
  int64_t x_row_stride = 0, residual_row_stride = 0, out_row_stride = 0, residual_out_row_stride = 0;
  float eps = 1e-6f;
};

void rms_norm(const RmsNormArgs& args, DType x_dtype, DType weight_dtype, int device, cudaStream_t stream);

// g[r] = W_t . concat(anchors[slot, 0..t]) with t = row_types[r], slot = row_slots[r]; W_t lives in
// weight_cat (hidden, hidden * m (m + 1) / 2) at column hidden * t (t + 1) / 2. Index arrays are int32 or int64.
struct AggregateArgs {
  const void* anchors = nullptr;
  const void* weight_cat = nullptr;
  const void* row_slots = nullptr;
  const void* row_types = nullptr;
  bool slots_int64 = false, types_int64 = false;
  void* out = nullptr;
  int num_slots = 0, num_types = 0, hidden = 0, rows = 0;
  int64_t anchor_stride_slot = 0, anchor_stride_type = 0, weight_row_stride = 0, out_row_stride = 0;
};

void aggregate_features(const AggregateArgs& args, DType dtype, int device, cudaStream_t stream);

}  // namespace spd
