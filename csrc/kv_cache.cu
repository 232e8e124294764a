// KV-cache append: rotate the new keys (HF half rotation) and write k, v at cache_seqlens[b] + [0, tq).
//
// The attention kernel fuses this same write for decode; this standalone launch serves callers that fill
// the cache without attending in the same step. Grid (batch * tq, hkv), head_dim / 2 threads: each thread
// moves one rotation pair (d, d + head_dim / 2) of k and the same two elements of v.
#include "common.cuh"

namespace spd {
namespace {

template <typename T>
__global__ void append_kv_kernel(const AppendKVArgs args) {
  const int b = blockIdx.x / args.tq;
  const int t = blockIdx.x % args.tq;
  const int head = blockIdx.y;
  const int half = args.head_dim / 2;
  const int d = threadIdx.x;
  const int pos = args.cache_seqlens[b] + t;
  if (d >= half || pos >= args.s_max) return;  // past capacity is a caller error; never write out of bounds
  const T* k_row = static_cast<const T*>(args.k_new) + b * args.k_new_stride[0] + t * args.k_new_stride[1] +
                   head * args.k_new_stride[2];
  const T* v_row = static_cast<const T*>(args.v_new) + b * args.v_new_stride[0] + t * args.v_new_stride[1] +
                   head * args.v_new_stride[2];
  T* k_dst = static_cast<T*>(args.k_cache) + b * args.k_cache_stride[0] +
             static_cast<int64_t>(pos) * args.k_cache_stride[1] + head * args.k_cache_stride[2];
  T* v_dst = static_cast<T*>(args.v_cache) + b * args.v_cache_stride[0] +
             static_cast<int64_t>(pos) * args.v_cache_stride[1] + head * args.v_cache_stride[2];
  const float2 k_rot = load_rotated_pair(k_row, d, half, args.rotary, pos);
  k_dst[d] = from_float<T>(k_rot.x);
  k_dst[d + half] = from_float<T>(k_rot.y);
  v_dst[d] = v_row[d];
  v_dst[d + half] = v_row[d + half];
}

}  // namespace

void append_kv_cache(const AppendKVArgs& args, DType dtype, int device, cudaStream_t stream) {
  if (args.head_dim % 2 != 0 || args.head_dim > 2048) throw std::invalid_argument("head_dim must be even, <= 2048");
  if (args.batch == 0 || args.tq == 0) return;
  DeviceGuard guard(device);
  dispatch_float_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(args.batch * args.tq, args.hkv);
    append_kv_kernel<T><<<grid, args.head_dim / 2, 0, stream>>>(args);
    check_launch("append_kv_kernel");
  });
}

}  // namespace spd
