// Fused residual add + RMSNorm with HF numerics: the sum is rounded to x's dtype (it becomes the new
// residual stream), the mean of squares and the scaling run in fp32, the normalised value is rounded to x's
// dtype before the weight multiply, and the product is rounded once to the output dtype.
//
// One CTA per row. Pass 1 reads x (+ residual), writes the new residual and accumulates the sum of squares;
// pass 2 re-reads the rounded sums (each thread its own elements, so no barrier is needed, and the row is
// still in L1/L2) and writes the output. 16-byte vectors when the row and pointers allow, scalars otherwise.
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace spd {
namespace {

// torch's promotion for weight * normed: an fp32 weight gives fp32, otherwise the weight matches x.
template <typename Tx, typename Tw>
using RmsNormOut = std::conditional_t<std::is_same_v<Tw, float>, float, Tx>;

template <typename Tx, typename Tw, int VEC>
__global__ void rms_norm_kernel(const RmsNormArgs args) {
  using Tout = RmsNormOut<Tx, Tw>;
  using XVec = Vec<Tx, VEC>;
  const int64_t row = blockIdx.x;
  const XVec* x = reinterpret_cast<const XVec*>(static_cast<const Tx*>(args.x) + row * args.x_row_stride);
  const XVec* residual =
      reinterpret_cast<const XVec*>(static_cast<const Tx*>(args.residual) + row * args.residual_row_stride);
  XVec* residual_out =
      reinterpret_cast<XVec*>(static_cast<Tx*>(args.residual_out) + row * args.residual_out_row_stride);
  const bool has_residual = args.residual != nullptr;
  const XVec* summed = has_residual ? residual_out : x;  // what pass 2 normalises
  const int vectors = args.hidden / VEC;

  float sum_squares = 0.f;
  for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
    XVec s = x[i];
    if (has_residual) {
      const XVec r = residual[i];
#pragma unroll
      for (int e = 0; e < VEC; ++e) s.v[e] = from_float<Tx>(to_float(s.v[e]) + to_float(r.v[e]));
      residual_out[i] = s;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float f = to_float(s.v[e]);
      sum_squares += f * f;
    }
  }

  __shared__ float warp_sums[32];
  __shared__ float inv_rms;
  sum_squares = group_sum<32>(sum_squares);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum_squares;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int warps = (blockDim.x + 31) / 32;
    float total = threadIdx.x < warps ? warp_sums[threadIdx.x] : 0.f;
    total = group_sum<32>(total);
    if (threadIdx.x == 0) inv_rms = rsqrtf(total / args.hidden + args.eps);
  }
  __syncthreads();

  const Vec<Tw, VEC>* weight = reinterpret_cast<const Vec<Tw, VEC>*>(args.weight);
  Vec<Tout, VEC>* out = reinterpret_cast<Vec<Tout, VEC>*>(static_cast<Tout*>(args.out) + row * args.out_row_stride);
  for (int i = threadIdx.x; i < vectors; i += blockDim.x) {
    const XVec s = summed[i];
    const Vec<Tw, VEC> w = weight[i];
    Vec<Tout, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float normed = to_float(from_float<Tx>(to_float(s.v[e]) * inv_rms));
      o.v[e] = from_float<Tout>(to_float(w.v[e]) * normed);
    }
    out[i] = o;
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename Tx, typename Tw>
void launch_rms_norm(const RmsNormArgs& args, cudaStream_t stream) {
  using Tout = RmsNormOut<Tx, Tw>;
  constexpr int kVec = 16 / sizeof(Tx);
  // Every row start must stay aligned to its vector type (an fp32 weight/output vector is 32 bytes for bf16 x).
  const bool vectorised =
      args.hidden % kVec == 0 && aligned(args.x, 16) && aligned(args.weight, sizeof(Tw) * kVec) &&
      aligned(args.out, sizeof(Tout) * kVec) &&
      (args.residual == nullptr || (aligned(args.residual, 16) && aligned(args.residual_out, 16))) &&
      args.x_row_stride % kVec == 0 && args.residual_row_stride % kVec == 0 && args.out_row_stride % kVec == 0 &&
      args.residual_out_row_stride % kVec == 0;
  const int per_thread = vectorised ? kVec : 1;
  const int threads = std::min(1024, std::max(32, (args.hidden / per_thread + 31) / 32 * 32));
  if (vectorised) {
    rms_norm_kernel<Tx, Tw, kVec><<<args.rows, threads, 0, stream>>>(args);
  } else {
    rms_norm_kernel<Tx, Tw, 1><<<args.rows, threads, 0, stream>>>(args);
  }
  check_launch("rms_norm_kernel");
}

}  // namespace

void rms_norm(const RmsNormArgs& args, DType x_dtype, DType weight_dtype, int device, cudaStream_t stream) {
  if (args.rows == 0) return;
  DeviceGuard guard(device);
  dispatch_float_type(x_dtype, [&](auto x_tag) {
    using Tx = decltype(x_tag);
    if (weight_dtype == x_dtype) {
      launch_rms_norm<Tx, Tx>(args, stream);
    } else if (weight_dtype == DType::kFloat32) {
      launch_rms_norm<Tx, float>(args, stream);
    } else {
      throw std::invalid_argument("rms_norm: weight must have x's dtype or float32");
    }
  });
}

}  // namespace spd
