// pybind11 bindings of spd_engine._C. Every function takes raw device pointers (as integers), element
// strides, dtype codes, the device index and a cudaStream_t handle (as an integer): no torch headers, so the
// module works with any torch build. spd_engine/ops/cuda_backend.py turns tensors into these arguments.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "ops.h"

namespace py = pybind11;

namespace {

using Strides = std::array<int64_t, 3>;

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}
cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }
void copy_strides(int64_t (&dst)[3], const Strides& src) {
  for (int i = 0; i < 3; ++i) dst[i] = src[i];
}

spd::RotaryTable rotary_table(std::uintptr_t cos, std::uintptr_t sin, int dtype, int64_t row_stride, int len) {
  spd::RotaryTable table;
  table.cos = as_ptr<const void>(cos);
  table.sin = as_ptr<const void>(sin);
  table.dtype = static_cast<spd::DType>(dtype);
  table.row_stride = row_stride;
  table.len = cos == 0 ? 0 : len;
  return table;
}

void attention_with_kvcache(std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t k,
                            std::uintptr_t v, std::uintptr_t cache_seqlens, std::uintptr_t out,
                            std::uintptr_t partial_out, std::uintptr_t partial_lse, const Strides& q_stride,
                            const Strides& k_cache_stride, const Strides& v_cache_stride, const Strides& k_stride,
                            const Strides& v_stride, const Strides& out_stride, std::uintptr_t rotary_cos,
                            std::uintptr_t rotary_sin, int rotary_dtype, int64_t rotary_row_stride, int rotary_len,
                            int batch, int tq, int hq, int hkv, int head_dim, int s_max, float softmax_scale,
                            bool causal, int num_splits, int split_len, int dtype, int device, std::uintptr_t stream) {
  spd::AttentionArgs args;
  args.q = as_ptr<const void>(q);
  args.k_cache = as_ptr<void>(k_cache);
  args.v_cache = as_ptr<void>(v_cache);
  args.k_new = as_ptr<const void>(k);
  args.v_new = as_ptr<const void>(v);
  args.cache_seqlens = as_ptr<const int32_t>(cache_seqlens);
  args.out = as_ptr<void>(out);
  args.partial_out = as_ptr<float>(partial_out);
  args.partial_lse = as_ptr<float>(partial_lse);
  copy_strides(args.q_stride, q_stride);
  copy_strides(args.k_cache_stride, k_cache_stride);
  copy_strides(args.v_cache_stride, v_cache_stride);
  copy_strides(args.k_new_stride, k_stride);
  copy_strides(args.v_new_stride, v_stride);
  copy_strides(args.out_stride, out_stride);
  args.rotary = rotary_table(rotary_cos, rotary_sin, rotary_dtype, rotary_row_stride, rotary_len);
  args.batch = batch;
  args.tq = tq;
  args.hq = hq;
  args.hkv = hkv;
  args.head_dim = head_dim;
  args.s_max = s_max;
  args.softmax_scale = softmax_scale;
  args.causal = causal;
  args.num_splits = num_splits;
  args.split_len = split_len;
  spd::attention_with_kvcache(args, static_cast<spd::DType>(dtype), device, as_stream(stream));
}

void append_kv_cache(std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t k, std::uintptr_t v,
                     std::uintptr_t cache_seqlens, const Strides& k_cache_stride, const Strides& v_cache_stride,
                     const Strides& k_stride, const Strides& v_stride, std::uintptr_t rotary_cos,
                     std::uintptr_t rotary_sin, int rotary_dtype, int64_t rotary_row_stride, int rotary_len,
                     int batch, int tq, int hkv, int head_dim, int s_max, int dtype, int device,
                     std::uintptr_t stream) {
  spd::AppendKVArgs args;
  args.k_cache = as_ptr<void>(k_cache);
  args.v_cache = as_ptr<void>(v_cache);
  args.k_new = as_ptr<const void>(k);
  args.v_new = as_ptr<const void>(v);
  args.cache_seqlens = as_ptr<const int32_t>(cache_seqlens);
  copy_strides(args.k_cache_stride, k_cache_stride);
  copy_strides(args.v_cache_stride, v_cache_stride);
  copy_strides(args.k_new_stride, k_stride);
  copy_strides(args.v_new_stride, v_stride);
  args.rotary = rotary_table(rotary_cos, rotary_sin, rotary_dtype, rotary_row_stride, rotary_len);
  args.batch = batch;
  args.tq = tq;
  args.hkv = hkv;
  args.head_dim = head_dim;
  args.s_max = s_max;
  spd::append_kv_cache(args, static_cast<spd::DType>(dtype), device, as_stream(stream));
}

void rms_norm(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t weight, std::uintptr_t out,
              std::uintptr_t residual_out, int64_t rows, int hidden, int64_t x_row_stride,
              int64_t residual_row_stride, int64_t out_row_stride, int64_t residual_out_row_stride, float eps,
              int x_dtype, int weight_dtype, int device, std::uintptr_t stream) {
  spd::RmsNormArgs args;
  args.x = as_ptr<const void>(x);
  args.residual = as_ptr<const void>(residual);
  args.weight = as_ptr<const void>(weight);
  args.out = as_ptr<void>(out);
  args.residual_out = as_ptr<void>(residual_out);
  args.rows = rows;
  args.hidden = hidden;
  args.x_row_stride = x_row_stride;
  args.residual_row_stride = residual_row_stride;
  args.out_row_stride = out_row_stride;
  args.residual_out_row_stride = residual_out_row_stride;
  args.eps = eps;
  spd::rms_norm(args, static_cast<spd::DType>(x_dtype), static_cast<spd::DType>(weight_dtype), device,
                as_stream(stream));
}

void aggregate_features(std::uintptr_t anchors, std::uintptr_t weight_cat, std::uintptr_t row_slots,
                        bool slots_int64, std::uintptr_t row_types, bool types_int64, std::uintptr_t out,
                        int num_slots, int num_types, int hidden, int rows, int64_t anchor_stride_slot,
                        int64_t anchor_stride_type, int64_t weight_row_stride, int64_t out_row_stride, int dtype,
                        int device, std::uintptr_t stream) {
  spd::AggregateArgs args;
  args.anchors = as_ptr<const void>(anchors);
  args.weight_cat = as_ptr<const void>(weight_cat);
  args.row_slots = as_ptr<const void>(row_slots);
  args.slots_int64 = slots_int64;
  args.row_types = as_ptr<const void>(row_types);
  args.types_int64 = types_int64;
  args.out = as_ptr<void>(out);
  args.num_slots = num_slots;
  args.num_types = num_types;
  args.hidden = hidden;
  args.rows = rows;
  args.anchor_stride_slot = anchor_stride_slot;
  args.anchor_stride_type = anchor_stride_type;
  args.weight_row_stride = weight_row_stride;
  args.out_row_stride = out_row_stride;
  spd::aggregate_features(args, static_cast<spd::DType>(dtype), device, as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "spd-engine CUDA kernels (raw pointers + stream handles; see spd_engine/ops/cuda_backend.py)";
  m.def("attention_with_kvcache", &attention_with_kvcache, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("k"), py::arg("v"), py::arg("cache_seqlens"), py::arg("out"), py::arg("partial_out"),
        py::arg("partial_lse"), py::arg("q_stride"), py::arg("k_cache_stride"), py::arg("v_cache_stride"),
        py::arg("k_stride"), py::arg("v_stride"), py::arg("out_stride"), py::arg("rotary_cos"),
        py::arg("rotary_sin"), py::arg("rotary_dtype"), py::arg("rotary_row_stride"), py::arg("rotary_len"),
        py::arg("batch"), py::arg("tq"), py::arg("hq"), py::arg("hkv"), py::arg("head_dim"), py::arg("s_max"),
        py::arg("softmax_scale"), py::arg("causal"), py::arg("num_splits"), py::arg("split_len"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("attention_chunk_keys", [](int dtype) { return spd::attention_chunk_keys(static_cast<spd::DType>(dtype)); },
        py::arg("dtype"), "Keys per shared-memory chunk of the attention kernel (split plans use whole chunks).");
  m.def("attention_rows_per_cta", &spd::attention_rows_per_cta, "Query rows (t, head-in-group) per attention CTA.");
  m.def("append_kv_cache", &append_kv_cache, py::arg("k_cache"), py::arg("v_cache"), py::arg("k"), py::arg("v"),
        py::arg("cache_seqlens"), py::arg("k_cache_stride"), py::arg("v_cache_stride"), py::arg("k_stride"),
        py::arg("v_stride"), py::arg("rotary_cos"), py::arg("rotary_sin"), py::arg("rotary_dtype"),
        py::arg("rotary_row_stride"), py::arg("rotary_len"), py::arg("batch"), py::arg("tq"), py::arg("hkv"),
        py::arg("head_dim"), py::arg("s_max"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("out"),
        py::arg("residual_out"), py::arg("rows"), py::arg("hidden"), py::arg("x_row_stride"),
        py::arg("residual_row_stride"), py::arg("out_row_stride"), py::arg("residual_out_row_stride"),
        py::arg("eps"), py::arg("x_dtype"), py::arg("weight_dtype"), py::arg("device"), py::arg("stream"));
  m.def("aggregate_features", &aggregate_features, py::arg("anchors"), py::arg("weight_cat"), py::arg("row_slots"),
        py::arg("slots_int64"), py::arg("row_types"), py::arg("types_int64"), py::arg("out"), py::arg("num_slots"),
        py::arg("num_types"), py::arg("hidden"), py::arg("rows"), py::arg("anchor_stride_slot"),
        py::arg("anchor_stride_type"), py::arg("weight_row_stride"), py::arg("out_row_stride"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"));
}
