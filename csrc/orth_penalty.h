// Orthogonality penalty of AdaLoRA for many adapters at once: the math shared by the CPU and CUDA builds.
//
// Every factor is seen as an L×r matrix X: X = P (out×r) for lora_B and X = Qᵀ for lora_A, so that the
// Gram matrix is G = XᵀX (r×r) in both cases and the deviation is D = G − I. Per factor k:
//   fro  (PEFT, loralib): term ‖D‖_F,   d term / dX = 2·X·D / ‖D‖  (0 when ‖D‖ = 0, as torch.norm does)
//   fro2 (the paper):     term ‖D‖²_F,  d term / dX = 4·X·D
// and the penalty is the mean of the terms over all factors.
//
// Work is scheduled as (factor, chunk) items: chunk c of factor k covers rows [c·kRowsPerChunk, …) of X.
// Pass 1 writes one partial Gram per item, pass 2 sums a factor's partials in chunk order (no atomics:
// results are bitwise reproducible), pass 3 averages the terms. The backward is one pass over the items.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ADALORA_HD __host__ __device__ __forceinline__
#else
#define ADALORA_HD inline
#endif

namespace adalora_fast {

constexpr int kModeFro = 0;
constexpr int kModeFro2 = 1;
constexpr int64_t kRowsPerChunk = 512;

// One factor, as the kernels see it. Plain integers so the table can be copied to the device in one piece.
struct FactorView {
  int64_t data;            // address of the parameter
  int64_t grad;            // address of its gradient (backward only)
  int64_t length;          // L: rows of X (out_features for P, in_features for Q)
  int64_t rank;            // r
  int64_t stride_l;        // element stride along L in the parameter
  int64_t stride_i;        // element stride along r in the parameter
  int64_t grad_stride_l;   // the same two strides in the gradient
  int64_t grad_stride_i;
  int64_t n_chunks;
  int64_t partial_offset;  // first entry of this factor's n_chunks·r² partial Grams
  int64_t dev_offset;      // first entry of this factor's r² deviation D
};

struct WorkItem {
  int64_t factor;
  int64_t chunk;
};

ADALORA_HD int64_t chunk_begin(int64_t chunk) { return chunk * kRowsPerChunk; }

ADALORA_HD int64_t chunk_end(const FactorView& f, int64_t chunk) {
  const int64_t end = (chunk + 1) * kRowsPerChunk;
  return end < f.length ? end : f.length;
}

template <typename scalar_t, typename acc_t>
ADALORA_HD acc_t load_x(const FactorView& f, int64_t l, int64_t i) {
  const scalar_t* x = reinterpret_cast<const scalar_t*>(f.data);
  return static_cast<acc_t>(x[l * f.stride_l + i * f.stride_i]);
}

// Σ_{l in chunk} X(l,i)·X(l,j): entry (i,j) of one chunk's partial Gram.
template <typename scalar_t, typename acc_t>
ADALORA_HD acc_t gram_chunk_entry(const FactorView& f, int64_t chunk, int64_t i, int64_t j) {
  acc_t sum = 0;
  const int64_t end = chunk_end(f, chunk);
  for (int64_t l = chunk_begin(chunk); l < end; ++l) {
    sum += load_x<scalar_t, acc_t>(f, l, i) * load_x<scalar_t, acc_t>(f, l, j);
  }
  return sum;
}

// D(i,j) = Σ_chunks partial(i,j) − δ_ij, summed in chunk order.
template <typename acc_t>
ADALORA_HD acc_t deviation_entry(const acc_t* partials, const FactorView& f, int64_t i, int64_t j) {
  const int64_t r2 = f.rank * f.rank;
  acc_t g = 0;
  for (int64_t c = 0; c < f.n_chunks; ++c) g += partials[f.partial_offset + c * r2 + i * f.rank + j];
  return g - (i == j ? acc_t(1) : acc_t(0));
}

template <typename acc_t>
ADALORA_HD acc_t penalty_term(int mode, acc_t sq_norm) {
  return mode == kModeFro2 ? sq_norm : static_cast<acc_t>(sqrt(sq_norm));
}

// c_k such that d penalty / dX_k = c_k · X_k · D_k, for an upstream gradient grad_loss.
template <typename acc_t>
ADALORA_HD acc_t gradient_coefficient(int mode, acc_t sq_norm, acc_t grad_loss, int64_t n_factors) {
  const acc_t g = grad_loss / static_cast<acc_t>(n_factors);
  if (mode == kModeFro2) return acc_t(4) * g;
  return sq_norm > acc_t(0) ? acc_t(2) * g / static_cast<acc_t>(sqrt(sq_norm)) : acc_t(0);
}

// Gradient entry (l,i) = c · Σ_j X(l,j)·D(j,i), stored into the gradient tensor.
template <typename scalar_t, typename acc_t>
ADALORA_HD void write_gradient_entry(const FactorView& f, const acc_t* dev, acc_t coef, int64_t l, int64_t i) {
  acc_t sum = 0;
  for (int64_t j = 0; j < f.rank; ++j) sum += load_x<scalar_t, acc_t>(f, l, j) * dev[f.dev_offset + j * f.rank + i];
  scalar_t* g = reinterpret_cast<scalar_t*>(f.grad);
  g[l * f.grad_stride_l + i * f.grad_stride_i] = static_cast<scalar_t>(coef * sum);
}

}  // namespace adalora_fast
