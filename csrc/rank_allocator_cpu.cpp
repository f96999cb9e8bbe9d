// The rank allocator's step on CPU tensors (adalora_fast/flat_state.py, FlatAdapterState), each part as one
// pass over its elements where the ATen ops it replaces would each be a dispatch (a CPU runs a multi-tensor op
// tensor by tensor): the same values as those ops, bit for bit. On CUDA tensors the allocator runs the ATen
// ops (their work is the device's there).
//
//   adalora_fast::importance_update_(Tensor[] params, Tensor[] grads, Tensor(a!) exp_avg_ipt,
//                                    Tensor(b!) exp_avg_unc, Tensor(c!) nonfinite_steps, Tensor control,
//                                    int score_slot, float beta1, float beta2, float? grad_scale) -> Tensor[]
//
// Element e of the flat buffers is element e of the parameters in list order. Per element, with every
// intermediate rounded to the parameter dtype as the ATen ops of FlatAdapterState._update_emas round it
// (opmath arithmetic, one rounding per op):
//   I = |θ·∇θ| (÷ grad_scale);  Ī ← β1·Ī + (1−β1)·I;  Ū ← β2·Ū + (1−β2)·|I − Ī|
// The EMAs are written only when the step scores (control[score_slot] ≠ 0) and every I is finite; a scoring
// step with a non-finite I adds one to nonfinite_steps. Returns [finite, step_finite] (0-dim bools: every I
// finite; finite or not scoring), or [] where a gradient's dtype, device or layout is not its parameter's:
// the caller then runs the ATen ops.
//
//   adalora_fast::mask_to_budget_(Tensor scores, Tensor(a!) keep, Tensor(b!) factor, Tensor(c!)[] lambdas,
//                                 int[] lambda_offsets, Tensor(d!) masked, Tensor(e!) nonfinite_steps,
//                                 Tensor control, int k_slot, int mask_slot, Tensor? step_finite) -> Tensor
//
// FlatAdapterState.mask: the threshold is the k-th smallest score (k = control[k_slot], NaN sorted last, as
// torch.sort sorts); where the step masks (control[mask_slot] ≠ 0, the step's sensitivity finite where
// step_finite is given, every score finite) keep ← (score > threshold), and factor ← keep (else 1); every
// λ (lambdas[i], r_i × 1) is multiplied by factor[lambda_offsets[i] …]; masked |= the step masked; a step that
// would mask with a non-finite score adds one to nonfinite_steps. Returns [threshold] (0-dim, the element a
// stable sort puts k-th), or [] where a λ's dtype, device or layout is not the scores' (the caller then runs
// the ATen ops); nothing is written before every input is checked.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace adalora_fast {
namespace {

// What an ATen in-place op does to each tensor it writes: advance its version counter, so that autograd sees
// the change (a graph that saved a λ, say, raises instead of differentiating through a stale value).
void bump_versions(std::initializer_list<const at::Tensor*> written) {
  for (const at::Tensor* t : written) torch::autograd::impl::bump_version(*t);
}

template <typename scalar_t>
struct Update {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t beta1, one_minus_beta1, beta2, one_minus_beta2, scale;
  bool scaled;

  static scalar_t round(opmath_t v) { return static_cast<scalar_t>(v); }
  static opmath_t op(scalar_t v) { return static_cast<opmath_t>(v); }

  // I of one element, as foreach_mul_ (θ·∇θ), abs_ and div_ leave it
  scalar_t sensitivity(scalar_t w, scalar_t g) const {
    const scalar_t ipt = round(std::abs(op(round(op(w) * op(g)))));
    return scaled ? round(op(ipt) / scale) : ipt;
  }

  // Ī, Ū of one element, as mul, mul, add, sub, abs_, mul, mul, add leave them
  void ema(scalar_t ipt, scalar_t& avg, scalar_t& unc) const {
    const scalar_t new_avg = round(op(round(op(avg) * beta1)) + op(round(op(ipt) * one_minus_beta1)));
    const scalar_t dev = round(std::abs(op(ipt) - op(new_avg)));
    unc = round(op(round(op(unc) * beta2)) + op(round(op(dev) * one_minus_beta2)));
    avg = new_avg;
  }
};

template <typename scalar_t>
bool all_finite(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& gs, const Update<scalar_t>& u) {
  for (size_t k = 0; k < ws.size(); ++k) {
    const scalar_t* w = ws[k].const_data_ptr<scalar_t>();
    const scalar_t* g = gs[k].const_data_ptr<scalar_t>();
    const int64_t n = ws[k].numel();
    bool finite = true;
    for (int64_t e = 0; e < n; ++e) finite &= std::isfinite(Update<scalar_t>::op(u.sensitivity(w[e], g[e])));
    if (!finite) return false;
  }
  return true;
}

template <typename scalar_t>
void update(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& gs, const Update<scalar_t>& u,
            scalar_t* avg, scalar_t* unc) {
  for (size_t k = 0; k < ws.size(); ++k) {
    const scalar_t* w = ws[k].const_data_ptr<scalar_t>();
    const scalar_t* g = gs[k].const_data_ptr<scalar_t>();
    const int64_t n = ws[k].numel();
    for (int64_t e = 0; e < n; ++e) u.ema(u.sensitivity(w[e], g[e]), avg[e], unc[e]);
    avg += n;
    unc += n;
  }
}

std::vector<at::Tensor> importance_update_cpu(at::TensorList params, at::TensorList grads, at::Tensor& exp_avg_ipt,
                                              at::Tensor& exp_avg_unc, at::Tensor& nonfinite_steps,
                                              const at::Tensor& control, int64_t score_slot, double beta1,
                                              double beta2, std::optional<double> grad_scale) {
  TORCH_CHECK(!params.empty() && params.size() == grads.size(), "importance_update_: ", params.size(),
              " parameters but ", grads.size(), " gradients");
  const auto dtype = exp_avg_ipt.scalar_type();
  for (const at::Tensor* buffer : {&exp_avg_ipt, &exp_avg_unc}) {
    TORCH_CHECK(buffer->device().is_cpu() && buffer->scalar_type() == dtype && buffer->is_contiguous() &&
                    buffer->dim() == 1,
                "importance_update_: the EMA buffers must be contiguous 1-D CPU tensors of one dtype");
  }
  TORCH_CHECK(exp_avg_unc.numel() == exp_avg_ipt.numel(), "importance_update_: the EMA buffers differ in size");
  TORCH_CHECK(nonfinite_steps.device().is_cpu() && nonfinite_steps.scalar_type() == at::kLong &&
                  nonfinite_steps.numel() == 1,
              "importance_update_: nonfinite_steps must be a one-element int64 CPU tensor");
  TORCH_CHECK(control.device().is_cpu() && control.scalar_type() == at::kLong && control.dim() == 1 &&
                  score_slot >= 0 && score_slot < control.numel(),
              "importance_update_: control must be a 1-D int64 CPU tensor holding slot ", score_slot);
  std::vector<at::Tensor> ws, gs;
  ws.reserve(params.size());
  gs.reserve(params.size());
  int64_t total = 0;
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& w = params[k];
    const at::Tensor& g = grads[k];
    if (!w.defined() || w.layout() != at::kStrided || !w.device().is_cpu() || w.scalar_type() != dtype ||
        !g.defined() || g.layout() != at::kStrided || g.device() != w.device() || g.scalar_type() != dtype ||
        g.sizes() != w.sizes()) {
      return {};  // (the ATen ops promote or broadcast what this pass does not: a λ of another dtype, say)
    }
    ws.push_back(w.contiguous());
    gs.push_back(g.contiguous());
    total += w.numel();
  }
  TORCH_CHECK(total == exp_avg_ipt.numel(), "importance_update_: the parameters hold ", total,
              " elements but the EMA buffers ", exp_avg_ipt.numel());
  const bool scoring = control.const_data_ptr<int64_t>()[score_slot * control.stride(0)] != 0;
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "importance_update_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const Update<scalar_t> u{static_cast<opmath_t>(beta1), static_cast<opmath_t>(1.0 - beta1),
                             static_cast<opmath_t>(beta2), static_cast<opmath_t>(1.0 - beta2),
                             static_cast<opmath_t>(grad_scale.value_or(1.0)), grad_scale.has_value()};
    finite = all_finite<scalar_t>(ws, gs, u);
    if (finite && scoring) update<scalar_t>(ws, gs, u, exp_avg_ipt.data_ptr<scalar_t>(), exp_avg_unc.data_ptr<scalar_t>());
  });
  if (scoring && !finite) nonfinite_steps.add_(1);
  bump_versions({&exp_avg_ipt, &exp_avg_unc});
  const auto flag = [](bool v) {
    at::Tensor t = at::empty({}, at::TensorOptions().dtype(at::kBool));
    t.data_ptr<bool>()[0] = v;
    return t;
  };
  return {flag(finite), flag(finite || !scoring)};
}

void check_cpu(const at::Tensor& t, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided && t.device().is_cpu() && t.scalar_type() == dtype,
              "mask_to_budget_: ", what, " must be a dense CPU tensor of dtype ", dtype);
}

int64_t control_value(const at::Tensor& control, int64_t slot) {
  return control.const_data_ptr<int64_t>()[slot * control.stride(0)];
}

std::vector<at::Tensor> mask_to_budget_cpu(const at::Tensor& scores, at::Tensor& keep, at::Tensor& factor,
                                           at::TensorList lambdas, at::IntArrayRef lambda_offsets, at::Tensor& masked,
                                           at::Tensor& nonfinite_steps, const at::Tensor& control, int64_t k_slot,
                                           int64_t mask_slot, const std::optional<at::Tensor>& step_finite) {
  const auto dtype = scores.scalar_type();
  const at::Tensor* vectors[] = {&scores, &keep, &factor};
  for (const at::Tensor* t : vectors) {
    check_cpu(*t, dtype, "scores, keep and factor");
    TORCH_CHECK(t->dim() == 1 && t->is_contiguous() && t->numel() == scores.numel(),
                "mask_to_budget_: scores, keep and factor must be contiguous 1-D tensors of one length");
  }
  check_cpu(masked, at::kBool, "masked");
  check_cpu(nonfinite_steps, at::kLong, "nonfinite_steps");
  check_cpu(control, at::kLong, "control");
  TORCH_CHECK(masked.numel() == 1 && nonfinite_steps.numel() == 1 && control.dim() == 1 && k_slot >= 0 &&
                  k_slot < control.numel() && mask_slot >= 0 && mask_slot < control.numel(),
              "mask_to_budget_: masked and nonfinite_steps hold one element, control the two slots");
  TORCH_CHECK(lambdas.size() == lambda_offsets.size(), "mask_to_budget_: ", lambdas.size(), " lambdas but ",
              lambda_offsets.size(), " offsets");
  if (step_finite.has_value()) check_cpu(*step_finite, at::kBool, "step_finite");
  // Every λ is checked before anything is written.
  for (size_t i = 0; i < lambdas.size(); ++i) {
    const at::Tensor& lam = lambdas[i];
    if (!lam.defined() || lam.layout() != at::kStrided || !lam.device().is_cpu() || lam.scalar_type() != dtype) {
      return {};  // (a λ of another dtype: the ATen ops cast it)
    }
    TORCH_CHECK(lam.dim() == 1 || (lam.dim() == 2 && lam.size(1) == 1), "mask_to_budget_: lambda ", i,
                " must be r × 1, got ", lam.sizes());
    TORCH_CHECK(lambda_offsets[i] >= 0 && lambda_offsets[i] + lam.numel() <= factor.numel(),
                "mask_to_budget_: lambda ", i, " reaches past the factor vector");
  }
  const int64_t n = scores.numel(), k = control_value(control, k_slot);
  TORCH_CHECK(k >= 1 && k <= n, "mask_to_budget_: the ", k, "-th smallest of ", n, " scores");
  at::Tensor threshold = at::empty({}, scores.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mask_to_budget_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto before = [](scalar_t a, scalar_t b) {  // torch.sort's ascending order: NaN last
      const opmath_t x = a, y = b;
      return !std::isnan(x) && (std::isnan(y) || x < y);
    };
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    std::vector<scalar_t> sorted(s, s + n);
    std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), before);
    // The k-th element of a stable sort: of the scores that tie with the k-th value (±0, NaNs), the one that
    // many places after the scores before them, in their original order; its own bits, returned.
    const scalar_t v = sorted[k - 1];
    int64_t tie = k - 1;
    for (int64_t i = 0; i < n; ++i) tie -= before(s[i], v) ? 1 : 0;
    scalar_t t = v;
    for (int64_t i = 0; i < n; ++i) {
      if (!before(s[i], v) && !before(v, s[i]) && tie-- == 0) {
        t = s[i];
        break;
      }
    }
    threshold.data_ptr<scalar_t>()[0] = t;
    bool do_mask = control_value(control, mask_slot) != 0;
    if (step_finite.has_value()) do_mask = do_mask && step_finite->const_data_ptr<bool>()[0];
    bool scores_ok = true;
    for (int64_t i = 0; i < n; ++i) scores_ok = scores_ok && std::isfinite(static_cast<opmath_t>(s[i]));
    if (do_mask && !scores_ok) nonfinite_steps.add_(1);
    do_mask = do_mask && scores_ok;
    scalar_t* kp = keep.data_ptr<scalar_t>();
    scalar_t* f = factor.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (do_mask) kp[i] = static_cast<opmath_t>(s[i]) > static_cast<opmath_t>(t) ? scalar_t(1) : scalar_t(0);
      f[i] = do_mask ? kp[i] : scalar_t(1);
    }
    for (size_t i = 0; i < lambdas.size(); ++i) {
      const at::Tensor& lam = lambdas[i];
      scalar_t* l = lam.data_ptr<scalar_t>();
      const int64_t stride = lam.stride(0);
      for (int64_t j = 0; j < lam.numel(); ++j) {
        scalar_t& x = l[j * stride];
        x = static_cast<scalar_t>(static_cast<opmath_t>(x) * static_cast<opmath_t>(f[lambda_offsets[i] + j]));
      }
    }
    if (do_mask) masked.data_ptr<bool>()[0] = true;
  });
  bump_versions({&keep, &factor, &masked});
  for (const at::Tensor& lam : lambdas) torch::autograd::impl::bump_version(lam);
  return {threshold};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adalora_fast, m) {
  m.def(
      "importance_update_(Tensor[] params, Tensor[] grads, Tensor(a!) exp_avg_ipt, Tensor(b!) exp_avg_unc, "
      "Tensor(c!) nonfinite_steps, Tensor control, int score_slot, float beta1, float beta2, float? grad_scale) "
      "-> Tensor[]");
  m.def(
      "mask_to_budget_(Tensor scores, Tensor(a!) keep, Tensor(b!) factor, Tensor(c!)[] lambdas, int[] lambda_offsets, "
      "Tensor(d!) masked, Tensor(e!) nonfinite_steps, Tensor control, int k_slot, int mask_slot, "
      "Tensor? step_finite) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(adalora_fast, CPU, m) {
  m.impl("importance_update_", &importance_update_cpu);
  m.impl("mask_to_budget_", &mask_to_budget_cpu);
}

}  // namespace adalora_fast
