// pybind11 bindings of spd_engine._C: no torch headers, so the module works with any torch build.
//
// Each kernel's argument struct (ops.h) is bound as a Python class together with its launch context (dtype
// codes, device index): AttentionArgs, AppendKVArgs, RmsNormArgs, AggregateArgs. Tensors are raw device
// pointers (integers), strides are element counts (3-tuples where ops.h has arrays), streams are cudaStream_t
// handles (integers). spd_engine/ops/cuda_backend.py fills one struct per plan, once, on the host; the
// per-call launchers (run_*) then take that prebuilt struct plus only the pointers that change from call to
// call, copy the struct on the C++ side, patch those pointers in and launch. Nothing per call is converted
// but a handful of integers. The classes are module-local, so a second build of the library (tests/test_build.py
// loads build/cmake-test's next to an installed one) registers its own instead of clashing.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "ops.h"

namespace py = pybind11;

namespace {

using Strides = std::array<int64_t, 3>;
using Address = std::uintptr_t;

template <typename T>
T as_ptr(Address address) {
  return reinterpret_cast<T>(address);
}
cudaStream_t as_stream(Address handle) { return reinterpret_cast<cudaStream_t>(handle); }
spd::DType as_dtype(int code) { return static_cast<spd::DType>(code); }

// A kernel's argument struct plus what its launcher needs besides (ops.h keeps those as launcher arguments).
struct AttentionCall {
  spd::AttentionArgs args;
  int dtype = 0, device = 0;
};
struct AppendKVCall {
  spd::AppendKVArgs args;
  int dtype = 0, device = 0;
};
struct RmsNormCall {
  spd::RmsNormArgs args;
  int x_dtype = 0, weight_dtype = 0, device = 0;
};
struct AggregateCall {
  spd::AggregateArgs args;
  int dtype = 0, device = 0;
};

// Properties over nested fields: pointers read and write as integers, strides as 3-tuples, enums as codes.
#define SPD_PTR(cls, Type, name, field)                                                                    \
  cls.def_property(                                                                                        \
      name, [](const Type& s) { return reinterpret_cast<Address>(s.field); },                              \
      [](Type& s, Address p) { s.field = reinterpret_cast<std::remove_reference_t<decltype(s.field)>>(p); })
#define SPD_STRIDES(cls, Type, name, field)                                                              \
  cls.def_property(                                                                                      \
      name, [](const Type& s) { return py::make_tuple(s.field[0], s.field[1], s.field[2]); },           \
      [](Type& s, const Strides& v) {                                                                    \
        for (int i = 0; i < 3; ++i) s.field[i] = v[i];                                                   \
      })
#define SPD_FIELD(cls, Type, name, field)                                                                \
  cls.def_property(                                                                                      \
      name, [](const Type& s) { return s.field; },                                                       \
      [](Type& s, std::remove_reference_t<decltype(std::declval<Type&>().field)> v) { s.field = v; })
#define SPD_DTYPE(cls, Type, name, field)                                                                \
  cls.def_property(                                                                                      \
      name, [](const Type& s) { return static_cast<int>(s.field); },                                     \
      [](Type& s, int code) { s.field = as_dtype(code); })

void bind_rotary(py::class_<AttentionCall>& attention, py::class_<AppendKVCall>& append) {
  SPD_PTR(attention, AttentionCall, "rotary_cos", args.rotary.cos);
  SPD_PTR(attention, AttentionCall, "rotary_sin", args.rotary.sin);
  SPD_DTYPE(attention, AttentionCall, "rotary_dtype", args.rotary.dtype);
  SPD_FIELD(attention, AttentionCall, "rotary_row_stride", args.rotary.row_stride);
  SPD_FIELD(attention, AttentionCall, "rotary_len", args.rotary.len);
  SPD_PTR(append, AppendKVCall, "rotary_cos", args.rotary.cos);
  SPD_PTR(append, AppendKVCall, "rotary_sin", args.rotary.sin);
  SPD_DTYPE(append, AppendKVCall, "rotary_dtype", args.rotary.dtype);
  SPD_FIELD(append, AppendKVCall, "rotary_row_stride", args.rotary.row_stride);
  SPD_FIELD(append, AppendKVCall, "rotary_len", args.rotary.len);
}

// A null rotary table (len 0) whatever the other rotary fields say: the kernels test len only.
template <typename Args>
void fix_rotary(Args& args) {
  if (args.rotary.cos == nullptr) args.rotary.len = 0;
}

void launch_attention(const AttentionCall& call, Address stream) {
  spd::AttentionArgs args = call.args;
  fix_rotary(args);
  spd::attention_with_kvcache(args, as_dtype(call.dtype), call.device, as_stream(stream));
}

void run_attention(const AttentionCall& call, Address q, Address k_cache, Address v_cache, Address k, Address v,
                   Address cache_seqlens, Address rotary_cos, Address rotary_sin, Address stream) {
  spd::AttentionArgs args = call.args;
  args.q = as_ptr<const void*>(q);
  args.k_cache = as_ptr<void*>(k_cache);
  args.v_cache = as_ptr<void*>(v_cache);
  args.k_new = as_ptr<const void*>(k);
  args.v_new = as_ptr<const void*>(v);
  args.cache_seqlens = as_ptr<const int32_t*>(cache_seqlens);
  args.rotary.cos = as_ptr<const void*>(rotary_cos);
  args.rotary.sin = as_ptr<const void*>(rotary_sin);
  fix_rotary(args);
  spd::attention_with_kvcache(args, as_dtype(call.dtype), call.device, as_stream(stream));
}

void launch_append_kv(const AppendKVCall& call, Address stream) {
  spd::AppendKVArgs args = call.args;
  fix_rotary(args);
  spd::append_kv_cache(args, as_dtype(call.dtype), call.device, as_stream(stream));
}

void launch_rms_norm(const RmsNormCall& call, Address stream) {
  spd::rms_norm(call.args, as_dtype(call.x_dtype), as_dtype(call.weight_dtype), call.device, as_stream(stream));
}

void run_rms_norm(const RmsNormCall& call, Address x, Address residual, Address weight, Address stream) {
  spd::RmsNormArgs args = call.args;
  args.x = as_ptr<const void*>(x);
  args.residual = as_ptr<const void*>(residual);
  args.weight = as_ptr<const void*>(weight);
  if (residual == 0) args.residual_out = nullptr;  // the kernel reads "no residual" from residual == null
  spd::rms_norm(args, as_dtype(call.x_dtype), as_dtype(call.weight_dtype), call.device, as_stream(stream));
}

void launch_aggregate(const AggregateCall& call, Address stream) {
  spd::aggregate_features(call.args, as_dtype(call.dtype), call.device, as_stream(stream));
}

void run_aggregate(const AggregateCall& call, Address anchors, Address weight_cat, Address row_slots,
                   Address row_types, Address stream) {
  spd::AggregateArgs args = call.args;
  args.anchors = as_ptr<const void*>(anchors);
  args.weight_cat = as_ptr<const void*>(weight_cat);
  args.row_slots = as_ptr<const void*>(row_slots);
  args.row_types = as_ptr<const void*>(row_types);
  spd::aggregate_features(args, as_dtype(call.dtype), call.device, as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "spd-engine CUDA kernels: bound argument structs + launchers (see spd_engine/ops/cuda_backend.py)";

  py::class_<AttentionCall> attention(m, "AttentionArgs", "spd::AttentionArgs (csrc/ops.h) + dtype, device",
                                     py::module_local());
  attention.def(py::init<>());
  SPD_PTR(attention, AttentionCall, "q", args.q);
  SPD_PTR(attention, AttentionCall, "k_cache", args.k_cache);
  SPD_PTR(attention, AttentionCall, "v_cache", args.v_cache);
  SPD_PTR(attention, AttentionCall, "k", args.k_new);
  SPD_PTR(attention, AttentionCall, "v", args.v_new);
  SPD_PTR(attention, AttentionCall, "cache_seqlens", args.cache_seqlens);
  SPD_PTR(attention, AttentionCall, "out", args.out);
  SPD_PTR(attention, AttentionCall, "partial_out", args.partial_out);
  SPD_PTR(attention, AttentionCall, "partial_lse", args.partial_lse);
  SPD_STRIDES(attention, AttentionCall, "q_stride", args.q_stride);
  SPD_STRIDES(attention, AttentionCall, "k_cache_stride", args.k_cache_stride);
  SPD_STRIDES(attention, AttentionCall, "v_cache_stride", args.v_cache_stride);
  SPD_STRIDES(attention, AttentionCall, "k_stride", args.k_new_stride);
  SPD_STRIDES(attention, AttentionCall, "v_stride", args.v_new_stride);
  SPD_STRIDES(attention, AttentionCall, "out_stride", args.out_stride);
  SPD_FIELD(attention, AttentionCall, "batch", args.batch);
  SPD_FIELD(attention, AttentionCall, "tq", args.tq);
  SPD_FIELD(attention, AttentionCall, "hq", args.hq);
  SPD_FIELD(attention, AttentionCall, "hkv", args.hkv);
  SPD_FIELD(attention, AttentionCall, "head_dim", args.head_dim);
  SPD_FIELD(attention, AttentionCall, "s_max", args.s_max);
  SPD_FIELD(attention, AttentionCall, "softmax_scale", args.softmax_scale);
  SPD_FIELD(attention, AttentionCall, "causal", args.causal);
  SPD_FIELD(attention, AttentionCall, "num_splits", args.num_splits);
  SPD_FIELD(attention, AttentionCall, "split_len", args.split_len);
  SPD_FIELD(attention, AttentionCall, "dtype", dtype);
  SPD_FIELD(attention, AttentionCall, "device", device);

  py::class_<AppendKVCall> append(m, "AppendKVArgs", "spd::AppendKVArgs (csrc/ops.h) + dtype, device",
                                  py::module_local());
  append.def(py::init<>());
  SPD_PTR(append, AppendKVCall, "k_cache", args.k_cache);
  SPD_PTR(append, AppendKVCall, "v_cache", args.v_cache);
  SPD_PTR(append, AppendKVCall, "k", args.k_new);
  SPD_PTR(append, AppendKVCall, "v", args.v_new);
  SPD_PTR(append, AppendKVCall, "cache_seqlens", args.cache_seqlens);
  SPD_STRIDES(append, AppendKVCall, "k_cache_stride", args.k_cache_stride);
  SPD_STRIDES(append, AppendKVCall, "v_cache_stride", args.v_cache_stride);
  SPD_STRIDES(append, AppendKVCall, "k_stride", args.k_new_stride);
  SPD_STRIDES(append, AppendKVCall, "v_stride", args.v_new_stride);
  SPD_FIELD(append, AppendKVCall, "batch", args.batch);
  SPD_FIELD(append, AppendKVCall, "tq", args.tq);
  SPD_FIELD(append, AppendKVCall, "hkv", args.hkv);
  SPD_FIELD(append, AppendKVCall, "head_dim", args.head_dim);
  SPD_FIELD(append, AppendKVCall, "s_max", args.s_max);
  SPD_FIELD(append, AppendKVCall, "dtype", dtype);
  SPD_FIELD(append, AppendKVCall, "device", device);
  bind_rotary(attention, append);

  py::class_<RmsNormCall> norm(m, "RmsNormArgs", "spd::RmsNormArgs (csrc/ops.h) + x_dtype, weight_dtype, device",
                               py::module_local());
  norm.def(py::init<>());
  SPD_PTR(norm, RmsNormCall, "x", args.x);
  SPD_PTR(norm, RmsNormCall, "residual", args.residual);
  SPD_PTR(norm, RmsNormCall, "weight", args.weight);
  SPD_PTR(norm, RmsNormCall, "out", args.out);
  SPD_PTR(norm, RmsNormCall, "residual_out", args.residual_out);
  SPD_FIELD(norm, RmsNormCall, "rows", args.rows);
  SPD_FIELD(norm, RmsNormCall, "hidden", args.hidden);
  SPD_FIELD(norm, RmsNormCall, "x_row_stride", args.x_row_stride);
  SPD_FIELD(norm, RmsNormCall, "residual_row_stride", args.residual_row_stride);
  SPD_FIELD(norm, RmsNormCall, "out_row_stride", args.out_row_stride);
  SPD_FIELD(norm, RmsNormCall, "residual_out_row_stride", args.residual_out_row_stride);
  SPD_FIELD(norm, RmsNormCall, "eps", args.eps);
  SPD_FIELD(norm, RmsNormCall, "x_dtype", x_dtype);
  SPD_FIELD(norm, RmsNormCall, "weight_dtype", weight_dtype);
  SPD_FIELD(norm, RmsNormCall, "device", device);

  py::class_<AggregateCall> aggregate(m, "AggregateArgs", "spd::AggregateArgs (csrc/ops.h) + dtype, device",
                                    py::module_local());
  aggregate.def(py::init<>());
  SPD_PTR(aggregate, AggregateCall, "anchors", args.anchors);
  SPD_PTR(aggregate, AggregateCall, "weight_cat", args.weight_cat);
  SPD_PTR(aggregate, AggregateCall, "row_slots", args.row_slots);
  SPD_PTR(aggregate, AggregateCall, "row_types", args.row_types);
  SPD_PTR(aggregate, AggregateCall, "out", args.out);
  SPD_FIELD(aggregate, AggregateCall, "slots_int64", args.slots_int64);
  SPD_FIELD(aggregate, AggregateCall, "types_int64", args.types_int64);
  SPD_FIELD(aggregate, AggregateCall, "num_slots", args.num_slots);
  SPD_FIELD(aggregate, AggregateCall, "num_types", args.num_types);
  SPD_FIELD(aggregate, AggregateCall, "hidden", args.hidden);
  SPD_FIELD(aggregate, AggregateCall, "rows", args.rows);
  SPD_FIELD(aggregate, AggregateCall, "anchor_stride_slot", args.anchor_stride_slot);
  SPD_FIELD(aggregate, AggregateCall, "anchor_stride_type", args.anchor_stride_type);
  SPD_FIELD(aggregate, AggregateCall, "weight_row_stride", args.weight_row_stride);
  SPD_FIELD(aggregate, AggregateCall, "out_row_stride", args.out_row_stride);
  SPD_FIELD(aggregate, AggregateCall, "dtype", dtype);
  SPD_FIELD(aggregate, AggregateCall, "device", device);

  // Whole-struct launchers: every pointer comes from the struct.
  m.def("attention_with_kvcache", &launch_attention, py::arg("args"), py::arg("stream"));
  m.def("append_kv_cache", &launch_append_kv, py::arg("args"), py::arg("stream"));
  m.def("rms_norm", &launch_rms_norm, py::arg("args"), py::arg("stream"));
  m.def("aggregate_features", &launch_aggregate, py::arg("args"), py::arg("stream"));
  // Per-call launchers (positional): a plan's prebuilt struct plus the pointers that change per call.
  m.def("run_attention", &run_attention, "AttentionArgs, then q, k_cache, v_cache, k, v, cache_seqlens, "
        "rotary_cos, rotary_sin, stream (addresses; 0 = no rotary)");
  m.def("run_rms_norm", &run_rms_norm, "RmsNormArgs, then x, residual (0 = none), weight, stream (addresses)");
  m.def("run_aggregate_features", &run_aggregate,
        "AggregateArgs, then anchors, weight_cat, row_slots, row_types, stream (addresses)");

  m.def("attention_chunk_keys", [](int dtype) { return spd::attention_chunk_keys(as_dtype(dtype)); },
        py::arg("dtype"), "Keys per shared-memory chunk of the attention kernel (split plans use whole chunks).");
  m.def("attention_rows_per_cta", &spd::attention_rows_per_cta, "Query rows (t, head-in-group) per attention CTA.");
}
