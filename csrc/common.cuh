// Shared helpers for the spd-engine CUDA kernels: dtype codes and dispatch, error checks, a device guard,
// float conversion, 16-byte vectors, warp reductions, cp.async and the HF "rotate half" rotary step.
//
// The extension never includes torch headers: every entry point takes raw device pointers, element strides,
// a dtype code and a cudaStream_t, so one build serves any torch build that shares the CUDA driver.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace spd {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("spd_engine._C: ") + what + ": " + cudaGetErrorString(status));
  }
}

// Launch errors are sticky per thread; read them right after the launch so they are reported by the op
// that caused them and not by some later, unrelated call.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// Makes `device` current for the launch and restores the caller's device afterwards. torch's custom-op
// dispatch does not switch devices for us, and tensors may live on a GPU other than the current one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

// Calls f(T{}) with T the C++ type of `dtype`; kernels are templates on T.
template <typename F>
void dispatch_float_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat16: f(__half{}); return;
    case DType::kBFloat16: f(__nv_bfloat16{}); return;
  }
  throw std::invalid_argument("spd_engine._C: unsupported dtype code " + std::to_string(static_cast<int>(dtype)));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Element i of an array whose dtype is only known at run time (rotary tables may be fp32 for bf16 models).
// The branch is uniform across the grid, so it costs a predicate, not divergence.
__device__ __forceinline__ float load_as_float(const void* base, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// N elements moved as one aligned load/store (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Sum / max over aligned groups of WIDTH lanes (WIDTH a power of two <= 32). Every lane of the warp must call.
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
template <int WIDTH>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Asynchronous 16-byte global->shared copy (sm_80+). With valid == false nothing is read and the 16 bytes
// are zero-filled, which is how rows past the live length become harmless zeros instead of stale data.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// Elements d and d + head_dim/2 of `row`, rotated to position `pos` with HF's non-interleaved "rotate half":
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). Computed in fp32. A position past the table is a caller
// error; it is left unrotated rather than read out of bounds.
template <typename T>
__device__ __forceinline__ float2 load_rotated_pair(const T* row, int d, int half, const RotaryTable& rotary,
                                                    int pos) {
  const float x1 = to_float(row[d]);
  const float x2 = to_float(row[d + half]);
  if (rotary.len == 0 || pos >= rotary.len) return make_float2(x1, x2);
  const int64_t i = static_cast<int64_t>(pos) * rotary.row_stride + d;
  const float c = load_as_float(rotary.cos, i, rotary.dtype);
  const float s = load_as_float(rotary.sin, i, rotary.dtype);
  return make_float2(x1 * c - x2 * s, x2 * c + x1 * s);
}

}  // namespace spd
