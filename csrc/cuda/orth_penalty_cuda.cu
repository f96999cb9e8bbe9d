// CUDA implementation of the orthogonality penalty ops (schema and CPU implementation: ../orth_penalty.cpp).
//
// Whatever the number of factors or their shapes: the forward is one table upload and three launches
// (partial Grams per (factor, chunk) item, per-factor deviation and norm, the mean), the backward one
// upload and one launch. Reductions run in a fixed order with no atomics, so results are bitwise
// reproducible; the per-entry math is the same as the CPU build's (../orth_penalty.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <vector>

#include "../orth_penalty_plan.h"

namespace adalora_fast {
namespace {

constexpr int kThreads = 256;  // a power of two: block_sum halves it

struct DeviceTables {
  const FactorView* factors;
  const WorkItem* items;
  at::Tensor storage;  // keeps the device copy alive for the launches (stream-ordered reuse)
};

// A CUDA graph's copy node reads its host source at every replay, so a table uploaded while a stream is
// being captured must never return to the pinned-memory cache: it is held for the life of the process
// (a few hundred bytes per factor, once per capture), whatever the torch version's host allocator does.
// Never destroyed (no static destructor racing the allocators' at exit).
void hold_for_graph_replays(const at::Tensor& host) {
  static std::mutex mutex;
  static auto* held = new std::vector<at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  held->push_back(host);
}

// Both tables in one pinned buffer, copied to the device asynchronously: one H2D copy per call, no sync.
DeviceTables upload_tables(const PenaltyPlan& plan, const at::Device& device) {
  const size_t factor_bytes = plan.factors.size() * sizeof(FactorView);
  const size_t item_bytes = plan.items.size() * sizeof(WorkItem);
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  // The pinned allocator may query events of earlier copies, which a capture in global mode forbids.
  std::optional<c10::cuda::CUDAStreamCaptureModeGuard> relaxed;
  if (capturing) relaxed.emplace(cudaStreamCaptureModeRelaxed);
  at::Tensor host = at::empty({static_cast<int64_t>(factor_bytes + item_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = static_cast<uint8_t*>(host.data_ptr());
  std::memcpy(h, plan.factors.data(), factor_bytes);
  std::memcpy(h + factor_bytes, plan.items.data(), item_bytes);
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  if (capturing) hold_for_graph_replays(host);
  const auto* d = static_cast<const uint8_t*>(dev.data_ptr());
  return {reinterpret_cast<const FactorView*>(d), reinterpret_cast<const WorkItem*>(d + factor_bytes), dev};
}

// Sum over the block in a fixed tree: deterministic for a fixed blockDim. The result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gram_partials_kernel(const FactorView* factors, const WorkItem* items, acc_t* partials) {
  const WorkItem item = items[blockIdx.x];
  const FactorView f = factors[item.factor];
  acc_t* out = partials + f.partial_offset + item.chunk * f.rank * f.rank;
  for (int64_t e = threadIdx.x; e < f.rank * f.rank; e += kThreads) {
    out[e] = gram_chunk_entry<scalar_t, acc_t>(f, item.chunk, e / f.rank, e % f.rank);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    deviation_kernel(const FactorView* factors, const acc_t* partials, acc_t* dev, acc_t* sq_norms) {
  const FactorView f = factors[blockIdx.x];
  acc_t sq = 0;
  for (int64_t e = threadIdx.x; e < f.rank * f.rank; e += kThreads) {
    const acc_t d = deviation_entry<acc_t>(partials, f, e / f.rank, e % f.rank);
    dev[f.dev_offset + e] = d;
    sq += d * d;
  }
  sq = block_sum<acc_t>(sq);
  if (threadIdx.x == 0) sq_norms[blockIdx.x] = sq;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    mean_term_kernel(const acc_t* sq_norms, int64_t n, int mode, scalar_t* loss) {
  acc_t s = 0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) s += penalty_term<acc_t>(mode, sq_norms[k]);
  s = block_sum<acc_t>(s);
  if (threadIdx.x == 0) *loss = static_cast<scalar_t>(s / static_cast<acc_t>(n));
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gradient_kernel(const FactorView* factors, const WorkItem* items, const acc_t* dev, const acc_t* sq_norms,
                    const acc_t* grad_loss, int mode, int64_t n) {
  const WorkItem item = items[blockIdx.x];
  const FactorView f = factors[item.factor];
  const acc_t coef = gradient_coefficient<acc_t>(mode, sq_norms[item.factor], *grad_loss, n);
  const int64_t l0 = chunk_begin(item.chunk);
  const int64_t entries = (chunk_end(f, item.chunk) - l0) * f.rank;
  for (int64_t e = threadIdx.x; e < entries; e += kThreads) {
    write_gradient_entry<scalar_t, acc_t>(f, dev, coef, l0 + e / f.rank, e % f.rank);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> orth_penalty_forward_cuda(at::TensorList factors,
                                                                         at::IntArrayRef is_right,
                                                                         c10::string_view mode) {
  const int m = parse_mode(mode);
  const PenaltyPlan plan = make_plan(factors, is_right);
  const c10::cuda::CUDAGuard guard(factors[0].device());
  const auto acc_opts = factors[0].options().dtype(accumulate_type(factors[0].scalar_type()));
  at::Tensor partials = at::empty({plan.partial_entries}, acc_opts);
  at::Tensor dev = at::empty({plan.dev_entries}, acc_opts);
  const int64_t n = static_cast<int64_t>(plan.factors.size());
  at::Tensor sq_norms = at::empty({n}, acc_opts);
  at::Tensor loss = at::empty({}, factors[0].options());
  const DeviceTables tables = upload_tables(plan, factors[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto n_items = static_cast<unsigned int>(plan.items.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, factors[0].scalar_type(), "orth_penalty_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gram_partials_kernel<scalar_t, acc_t><<<n_items, kThreads, 0, stream>>>(tables.factors, tables.items,
                                                                            partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    deviation_kernel<acc_t><<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(
        tables.factors, partials.data_ptr<acc_t>(), dev.data_ptr<acc_t>(), sq_norms.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mean_term_kernel<scalar_t, acc_t><<<1, kThreads, 0, stream>>>(sq_norms.data_ptr<acc_t>(), n, m,
                                                                  loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, dev, sq_norms};
}

std::vector<at::Tensor> orth_penalty_backward_cuda(const at::Tensor& grad_loss, at::TensorList factors,
                                                   at::IntArrayRef is_right, const at::Tensor& dev,
                                                   const at::Tensor& sq_norms, c10::string_view mode) {
  // Validation first: the guard below reads factors[0], which exists only once the plan has checked it.
  BackwardSetup setup = prepare_backward(grad_loss, factors, is_right, dev, sq_norms, mode);
  const c10::cuda::CUDAGuard guard(factors[0].device());
  const PenaltyPlan& plan = setup.plan;
  const int m = setup.mode;
  const DeviceTables tables = upload_tables(plan, factors[0].device());
  const auto acc = accumulate_type(factors[0].scalar_type());
  const at::Tensor dev_c = dev.to(acc).contiguous();
  const at::Tensor sq_c = sq_norms.to(acc).contiguous();
  const at::Tensor g = grad_loss.to(factors[0].device(), acc).reshape({1});  // stays on the device: no sync
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto n_items = static_cast<unsigned int>(plan.items.size());
  const int64_t n = static_cast<int64_t>(plan.factors.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, factors[0].scalar_type(), "orth_penalty_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gradient_kernel<scalar_t, acc_t><<<n_items, kThreads, 0, stream>>>(
        tables.factors, tables.items, dev_c.data_ptr<acc_t>(), sq_c.data_ptr<acc_t>(), g.data_ptr<acc_t>(), m, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return setup.grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(adalora_fast, CUDA, m) {
  m.impl("orth_penalty_forward", &orth_penalty_forward_cuda);
  m.impl("orth_penalty_backward", &orth_penalty_backward_cuda);
}

}  // namespace adalora_fast
