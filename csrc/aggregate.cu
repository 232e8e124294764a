// Multi-depth feature aggregation of the draft module, every row in one launch:
//   g[r] = W_t . concat(anchors[slot, 0], ..., anchors[slot, t]),  slot = row_slots[r], t = row_types[r].
// W_t is the (H, (t+1) H) block of weight_cat that starts at column H t (t+1) / 2, so output feature n of row
// r is the dot product of (t+1) anchor vectors with t+1 consecutive H-long pieces of weight_cat row n. The
// anchors are read where they are; no concatenated copy is made.
//
// Grid (ceil(H / 8), R), 256 threads: one warp per output feature, lanes striding over H with 16-byte
// vectors when H and the pointers allow. The eight warps of a CTA share the row's anchors through L1.
// An out-of-range slot or type (a caller bug) yields NaN rather than an out-of-bounds read.
#include "common.cuh"

namespace spd {
namespace {

constexpr int kWarpsPerCta = 8;

__device__ __forceinline__ int64_t load_index(const void* base, int64_t i, bool is_int64) {
  return is_int64 ? static_cast<const int64_t*>(base)[i] : static_cast<const int32_t*>(base)[i];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarpsPerCta * 32) aggregate_features_kernel(const AggregateArgs args) {
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarpsPerCta + threadIdx.x / 32;
  const int r = blockIdx.y;
  if (n >= args.hidden) return;  // whole warps leave; the kernel has no block barrier
  const int64_t slot = load_index(args.row_slots, r, args.slots_int64);
  const int64_t type = load_index(args.row_types, r, args.types_int64);
  T* out = static_cast<T*>(args.out) + r * args.out_row_stride + n;
  if (slot < 0 || slot >= args.num_slots || type < 0 || type >= args.num_types) {
    if (lane == 0) *out = from_float<T>(NAN);
    return;
  }
  const T* anchors = static_cast<const T*>(args.anchors) + slot * args.anchor_stride_slot;
  const T* weight = static_cast<const T*>(args.weight_cat) + n * args.weight_row_stride +
                    args.hidden * type * (type + 1) / 2;
  float acc = 0.f;
  for (int64_t j = 0; j <= type; ++j) {
    const Vec<T, VEC>* a = reinterpret_cast<const Vec<T, VEC>*>(anchors + j * args.anchor_stride_type);
    const Vec<T, VEC>* w = reinterpret_cast<const Vec<T, VEC>*>(weight + j * args.hidden);
    for (int i = lane; i < args.hidden / VEC; i += 32) {
      const Vec<T, VEC> av = a[i], wv = w[i];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc += to_float(av.v[e]) * to_float(wv.v[e]);
    }
  }
  acc = group_sum<32>(acc);
  if (lane == 0) *out = from_float<T>(acc);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void launch_aggregate(const AggregateArgs& args, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorised = args.hidden % kVec == 0 && aligned16(args.anchors) && aligned16(args.weight_cat) &&
                          args.anchor_stride_slot % kVec == 0 && args.anchor_stride_type % kVec == 0 &&
                          args.weight_row_stride % kVec == 0;
  const dim3 grid((args.hidden + kWarpsPerCta - 1) / kWarpsPerCta, args.rows);
  if (vectorised) {
    aggregate_features_kernel<T, kVec><<<grid, kWarpsPerCta * 32, 0, stream>>>(args);
  } else {
    aggregate_features_kernel<T, 1><<<grid, kWarpsPerCta * 32, 0, stream>>>(args);
  }
  check_launch("aggregate_features_kernel");
}

}  // namespace

void aggregate_features(const AggregateArgs& args, DType dtype, int device, cudaStream_t stream) {
  if (args.rows == 0 || args.hidden == 0) return;
  DeviceGuard guard(device);
  dispatch_float_type(dtype, [&](auto tag) { launch_aggregate<decltype(tag)>(args, stream); });
}

}  // namespace spd
