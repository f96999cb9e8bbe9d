// The orthogonality penalty op: schema, planning and the CPU implementation (always built).
//
//   adalora_fast::orth_penalty_forward(Tensor[] factors, int[] is_right, str mode)
//       -> (Tensor loss, Tensor deviation, Tensor sq_norms)
//   adalora_fast::orth_penalty_backward(Tensor grad_loss, Tensor[] factors, int[] is_right,
//                                       Tensor deviation, Tensor sq_norms, str mode) -> Tensor[]
//
// `factors` are lora_A (is_right = 1, r×in) and lora_B (is_right = 0, out×r) matrices of one dtype and
// device; `deviation` packs every G − I (accumulation dtype) and `sq_norms` holds ‖G − I‖²_F per factor.
// The autograd formula and the fake (meta) implementation are registered from Python.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "orth_penalty_plan.h"

namespace adalora_fast {

int parse_mode(c10::string_view mode) {
  if (mode == "fro") return kModeFro;
  if (mode == "fro2") return kModeFro2;
  TORCH_CHECK(false, "orth_penalty: mode must be 'fro' or 'fro2', got '", std::string(mode), "'");
  return kModeFro;
}

namespace {
// The dtypes the kernels are instantiated for (AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, ...)).
bool is_supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

PenaltyPlan make_plan(at::TensorList factors, at::IntArrayRef is_right) {
  TORCH_CHECK(!factors.empty(), "orth_penalty: no lora_A / lora_B matrices were given");
  TORCH_CHECK(factors.size() == is_right.size(), "orth_penalty: ", factors.size(), " factors but ",
              is_right.size(), " is_right flags");
  const auto dtype = factors[0].scalar_type();
  const auto device = factors[0].device();
  // Every factor is checked before any is planned: nothing below reads a tensor that failed a check.
  for (size_t k = 0; k < factors.size(); ++k) {
    const at::Tensor& p = factors[k];
    TORCH_CHECK(p.defined(), "orth_penalty: factor ", k, " is an undefined tensor");
    TORCH_CHECK(p.layout() == at::kStrided, "orth_penalty: factor ", k, " must be a strided (dense) tensor, got ",
                p.layout());
    TORCH_CHECK(p.dim() == 2, "orth_penalty: factor ", k, " must be 2-D, got shape ", p.sizes());
    TORCH_CHECK(is_supported_dtype(p.scalar_type()),
                "orth_penalty: factors must be floating point (float64, float32, float16 or bfloat16), factor ", k,
                " is ", p.scalar_type());
    TORCH_CHECK(p.scalar_type() == dtype, "orth_penalty: factor ", k, " is ", p.scalar_type(),
                " but factor 0 is ", dtype, "; call once per dtype");
    TORCH_CHECK(p.device() == device, "orth_penalty: factor ", k, " is on ", p.device(), " but factor 0 is on ",
                device);
  }
  PenaltyPlan plan;
  plan.factors.reserve(factors.size());
  for (size_t k = 0; k < factors.size(); ++k) {
    const at::Tensor& p = factors[k];
    const bool right = is_right[k] != 0;
    FactorView f{};
    f.data = reinterpret_cast<int64_t>(p.data_ptr());
    f.length = right ? p.size(1) : p.size(0);
    f.rank = right ? p.size(0) : p.size(1);
    f.stride_l = right ? p.stride(1) : p.stride(0);
    f.stride_i = right ? p.stride(0) : p.stride(1);
    f.n_chunks = std::max<int64_t>(1, (f.length + kRowsPerChunk - 1) / kRowsPerChunk);
    f.partial_offset = plan.partial_entries;
    f.dev_offset = plan.dev_entries;
    plan.partial_entries += f.n_chunks * f.rank * f.rank;
    plan.dev_entries += f.rank * f.rank;
    for (int64_t c = 0; c < f.n_chunks; ++c) plan.items.push_back({static_cast<int64_t>(k), c});
    plan.factors.push_back(f);
  }
  return plan;
}

std::vector<at::Tensor> allocate_gradients(PenaltyPlan& plan, at::TensorList factors, at::IntArrayRef is_right) {
  std::vector<at::Tensor> grads;
  grads.reserve(factors.size());
  for (size_t k = 0; k < factors.size(); ++k) {
    at::Tensor g = at::empty(factors[k].sizes(), factors[k].options());
    const bool right = is_right[k] != 0;
    FactorView& f = plan.factors[k];
    f.grad = reinterpret_cast<int64_t>(g.data_ptr());
    f.grad_stride_l = right ? g.stride(1) : g.stride(0);
    f.grad_stride_i = right ? g.stride(0) : g.stride(1);
    grads.push_back(std::move(g));
  }
  return grads;
}

BackwardSetup prepare_backward(const at::Tensor& grad_loss, at::TensorList factors, at::IntArrayRef is_right,
                               const at::Tensor& dev, const at::Tensor& sq_norms, c10::string_view mode) {
  BackwardSetup setup{parse_mode(mode), make_plan(factors, is_right), {}};
  const auto device = factors[0].device();
  const struct {
    const at::Tensor& t;
    const char* name;
  } saved[] = {{grad_loss, "grad_loss"}, {dev, "deviation"}, {sq_norms, "sq_norms"}};
  for (const auto& s : saved) {
    TORCH_CHECK(s.t.defined() && s.t.layout() == at::kStrided && at::isFloatingType(s.t.scalar_type()),
                "orth_penalty_backward: ", s.name, " must be a dense floating point tensor");
    TORCH_CHECK(s.t.device() == device, "orth_penalty_backward: ", s.name, " is on ", s.t.device(),
                " but the factors are on ", device);
  }
  TORCH_CHECK(grad_loss.numel() == 1, "orth_penalty_backward: grad_loss must have one element, got shape ",
              grad_loss.sizes());
  TORCH_CHECK(dev.numel() == setup.plan.dev_entries && sq_norms.numel() == static_cast<int64_t>(factors.size()),
              "orth_penalty_backward: saved workspaces do not match the factors (deviation has ", dev.numel(),
              " entries for ", setup.plan.dev_entries, ", sq_norms ", sq_norms.numel(), " for ", factors.size(), ")");
  setup.grads = allocate_gradients(setup.plan, factors, is_right);
  return setup;
}

namespace {

// The CPU loops read a chunk of X once into a row-major acc_t buffer (rows padded with zeros to a multiple of
// kPad columns, and to a multiple of 4 rows), then form every entry's sum in the order gram_chunk_entry and
// write_gradient_entry do (the same sums, bit for bit): a tile of 4 rows × 2 vectors of independent sums at a
// time, held in registers across the whole reduction (16-byte GCC/Clang vectors, one lane per sum, so each
// sum's order is the scalar loop's; the tile is written out with named accumulators, which GCC keeps in
// registers where it spills an array of vectors).
constexpr int64_t kPad = 8;  // a multiple of a tile's columns for float (8) and double (4)

template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(16)));
  static constexpr int64_t kLanes = 16 / sizeof(acc_t);
};

template <typename acc_t>
inline typename Vec<acc_t>::type load_vec(const acc_t* p) {
  typename Vec<acc_t>::type v;
  std::memcpy(&v, p, sizeof(v));  // (unaligned)
  return v;
}

// A 4-row tile of sums, two vectors per row: row a's sums are lo[a] (columns c0…) and hi[a] (c0 + kLanes…).
template <typename acc_t>
struct Tile {
  using V = typename Vec<acc_t>::type;
  static constexpr int64_t kCols = 2 * Vec<acc_t>::kLanes;
  V lo0 = {}, hi0 = {}, lo1 = {}, hi1 = {}, lo2 = {}, hi2 = {}, lo3 = {}, hi3 = {};

  // row a += x[a] · (lo, hi), for a = 0…3
  inline void add(acc_t x0, acc_t x1, acc_t x2, acc_t x3, V lo, V hi) {
    lo0 += x0 * lo, hi0 += x0 * hi, lo1 += x1 * lo, hi1 += x1 * hi;
    lo2 += x2 * lo, hi2 += x2 * hi, lo3 += x3 * lo, hi3 += x3 * hi;
  }
  // out[a][b], b < kCols
  inline void unpack(acc_t (&out)[4][kCols]) const {
    const V rows[4][2] = {{lo0, hi0}, {lo1, hi1}, {lo2, hi2}, {lo3, hi3}};
    for (int a = 0; a < 4; ++a) std::memcpy(out[a], rows[a], sizeof(out[a]));
  }
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <typename scalar_t, typename acc_t>
void load_chunk(const FactorView& f, int64_t begin, int64_t end, int64_t width, std::vector<acc_t>& buf) {
  const scalar_t* x = reinterpret_cast<const scalar_t*>(f.data);
  const int64_t r = f.rank;
  buf.assign(static_cast<size_t>(round_up(end - begin, 4) * width), acc_t(0));
  for (int64_t l = begin; l < end; ++l) {
    const scalar_t* row = x + l * f.stride_l;
    acc_t* out = buf.data() + (l - begin) * width;
    for (int64_t i = 0; i < r; ++i) out[i] = static_cast<acc_t>(row[i * f.stride_i]);
  }
}

// out (r×r) = Σ_l X(l,·)ᵀ·X(l,·) over the chunk's rows, in row order. Tiles on and right of the diagonal's
// tile column are summed; each sum is written at (i, j) and (j, i), the same sum (the products commute).
template <typename acc_t>
void chunk_gram(const acc_t* __restrict buf, int64_t rows, int64_t r, int64_t width, acc_t* __restrict out) {
  using T = Tile<acc_t>;
  constexpr int64_t lanes = Vec<acc_t>::kLanes;
  for (int64_t i0 = 0; i0 < r; i0 += 4) {
    for (int64_t j0 = i0 / T::kCols * T::kCols; j0 < r; j0 += T::kCols) {
      T tile;
      for (int64_t l = 0; l < rows; ++l) {
        const acc_t* row = buf + l * width;
        tile.add(row[i0], row[i0 + 1], row[i0 + 2], row[i0 + 3], load_vec(row + j0), load_vec(row + j0 + lanes));
      }
      acc_t sums[4][T::kCols];
      tile.unpack(sums);
      for (int64_t a = 0; a < 4 && i0 + a < r; ++a) {
        for (int64_t b = 0; b < T::kCols && j0 + b < r; ++b) {
          out[(i0 + a) * r + j0 + b] = sums[a][b];
          out[(j0 + b) * r + i0 + a] = sums[a][b];
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_cpu_impl(const PenaltyPlan& plan, int mode, acc_t* partials, acc_t* dev, acc_t* sq_norms, acc_t* loss) {
  const auto& fs = plan.factors;
  // Pass 1: one partial Gram per (factor, chunk) item.
  at::parallel_for(0, static_cast<int64_t>(plan.items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf;
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem item = plan.items[w];
      const FactorView& f = fs[item.factor];
      const int64_t first = chunk_begin(item.chunk), stop = chunk_end(f, item.chunk);
      const int64_t width = round_up(f.rank, kPad);
      load_chunk<scalar_t, acc_t>(f, first, stop, width, buf);
      chunk_gram<acc_t>(buf.data(), stop - first, f.rank, width,
                        partials + f.partial_offset + item.chunk * f.rank * f.rank);
    }
  });
  // Pass 2: D = Σ partials − I and ‖D‖², per factor, in a fixed order.
  at::parallel_for(0, static_cast<int64_t>(fs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const FactorView& f = fs[k];
      acc_t sq = 0;
      for (int64_t i = 0; i < f.rank; ++i) {
        for (int64_t j = 0; j < f.rank; ++j) {
          const acc_t d = deviation_entry<acc_t>(partials, f, i, j);
          dev[f.dev_offset + i * f.rank + j] = d;
          sq += d * d;
        }
      }
      sq_norms[k] = sq;
    }
  });
  // Pass 3: the mean of the terms.
  acc_t total = 0;
  for (size_t k = 0; k < fs.size(); ++k) total += penalty_term<acc_t>(mode, sq_norms[k]);
  *loss = total / static_cast<acc_t>(fs.size());
}

// gradient (l,i) = c · Σ_j X(l,j)·D(j,i), j in order, for the chunk's rows, a tile at a time, over D with its
// columns padded to the buffer's width.
template <typename scalar_t, typename acc_t>
void chunk_gradient(const FactorView& f, int64_t first, int64_t stop, int64_t width, const acc_t* __restrict buf,
                    const acc_t* __restrict d, acc_t coef) {
  using T = Tile<acc_t>;
  constexpr int64_t lanes = Vec<acc_t>::kLanes;
  const int64_t r = f.rank;
  scalar_t* g = reinterpret_cast<scalar_t*>(f.grad);
  for (int64_t l0 = first; l0 < stop; l0 += 4) {
    const acc_t* x = buf + (l0 - first) * width;
    for (int64_t i0 = 0; i0 < r; i0 += T::kCols) {
      T tile;
      for (int64_t j = 0; j < r; ++j) {
        const acc_t* dj = d + j * width + i0;
        tile.add(x[j], x[width + j], x[2 * width + j], x[3 * width + j], load_vec(dj), load_vec(dj + lanes));
      }
      acc_t sums[4][T::kCols];
      tile.unpack(sums);
      for (int64_t a = 0; a < 4 && l0 + a < stop; ++a) {
        for (int64_t b = 0; b < T::kCols && i0 + b < r; ++b) {
          g[(l0 + a) * f.grad_stride_l + (i0 + b) * f.grad_stride_i] = static_cast<scalar_t>(coef * sums[a][b]);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_cpu_impl(const PenaltyPlan& plan, int mode, acc_t grad_loss, const acc_t* dev, const acc_t* sq_norms) {
  const auto& fs = plan.factors;
  const int64_t n = static_cast<int64_t>(fs.size());
  at::parallel_for(0, static_cast<int64_t>(plan.items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf, d_padded;
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem item = plan.items[w];
      const FactorView& f = fs[item.factor];
      const int64_t r = f.rank, width = round_up(r, kPad);
      const acc_t coef = gradient_coefficient<acc_t>(mode, sq_norms[item.factor], grad_loss, n);
      const int64_t first = chunk_begin(item.chunk), stop = chunk_end(f, item.chunk);
      load_chunk<scalar_t, acc_t>(f, first, stop, width, buf);
      d_padded.assign(static_cast<size_t>(r * width), acc_t(0));
      for (int64_t j = 0; j < r; ++j) std::copy_n(dev + f.dev_offset + j * r, r, d_padded.data() + j * width);
      chunk_gradient<scalar_t, acc_t>(f, first, stop, width, buf.data(), d_padded.data(), coef);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> orth_penalty_forward_cpu(at::TensorList factors, at::IntArrayRef is_right,
                                                                        c10::string_view mode) {
  const int m = parse_mode(mode);
  const PenaltyPlan plan = make_plan(factors, is_right);
  const auto acc_opts = factors[0].options().dtype(accumulate_type(factors[0].scalar_type()));
  at::Tensor partials = at::empty({plan.partial_entries}, acc_opts);
  at::Tensor dev = at::empty({plan.dev_entries}, acc_opts);
  at::Tensor sq_norms = at::empty({static_cast<int64_t>(factors.size())}, acc_opts);
  at::Tensor loss = at::empty({}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, factors[0].scalar_type(), "orth_penalty_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_cpu_impl<scalar_t, acc_t>(plan, m, partials.data_ptr<acc_t>(), dev.data_ptr<acc_t>(),
                                      sq_norms.data_ptr<acc_t>(), loss.data_ptr<acc_t>());
  });
  return {loss.to(factors[0].scalar_type()), dev, sq_norms};
}

std::vector<at::Tensor> orth_penalty_backward_cpu(const at::Tensor& grad_loss, at::TensorList factors,
                                                  at::IntArrayRef is_right, const at::Tensor& dev,
                                                  const at::Tensor& sq_norms, c10::string_view mode) {
  BackwardSetup setup = prepare_backward(grad_loss, factors, is_right, dev, sq_norms, mode);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, factors[0].scalar_type(), "orth_penalty_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor dev_c = dev.to(accumulate_type(factors[0].scalar_type())).contiguous();
    const at::Tensor sq_c = sq_norms.to(dev_c.scalar_type()).contiguous();
    const acc_t g = grad_loss.to(dev_c.scalar_type()).item<acc_t>();
    backward_cpu_impl<scalar_t, acc_t>(setup.plan, setup.mode, g, dev_c.data_ptr<acc_t>(), sq_c.data_ptr<acc_t>());
  });
  return setup.grads;
}

}  // namespace

TORCH_LIBRARY(adalora_fast, m) {
  m.def("orth_penalty_forward(Tensor[] factors, int[] is_right, str mode) -> (Tensor, Tensor, Tensor)");
  m.def(
      "orth_penalty_backward(Tensor grad_loss, Tensor[] factors, int[] is_right, Tensor deviation, "
      "Tensor sq_norms, str mode) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(adalora_fast, CPU, m) {
  m.impl("orth_penalty_forward", &orth_penalty_forward_cpu);
  m.impl("orth_penalty_backward", &orth_penalty_backward_cpu);
}

}  // namespace adalora_fast
