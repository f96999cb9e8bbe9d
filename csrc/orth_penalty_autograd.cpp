// The eager entry point of the orthogonality penalty: the forward op and its backward as one C++ autograd
// node, for the calls adalora_fast/penalty.py makes outside torch.compile (which traces orth_penalty_forward
// and its Python-registered autograd instead).
//
//   adalora_fast::orth_penalty(Tensor[] factors, int[] is_right, str mode) -> Tensor loss
//
// The same ops (orth_penalty_forward / orth_penalty_backward, through the dispatcher: CPU or CUDA) and the same
// saved tensors as a Python autograd.Function would use, without its per-factor Python work: a model has
// hundreds of factors, and each crossed the Python boundary once in the forward and twice in the backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace adalora_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(at::TensorList factors, at::IntArrayRef is_right,
                                                            c10::string_view mode) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adalora_fast::orth_penalty_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(at::TensorList, at::IntArrayRef,
                                                                                    c10::string_view)>();
  return op.call(factors, is_right, mode);
}

std::vector<at::Tensor> call_backward(const at::Tensor& grad_loss, at::TensorList factors, at::IntArrayRef is_right,
                                      const at::Tensor& dev, const at::Tensor& sq_norms, c10::string_view mode) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adalora_fast::orth_penalty_backward", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::IntArrayRef,
                                                            const at::Tensor&, const at::Tensor&, c10::string_view)>();
  return op.call(grad_loss, factors, is_right, dev, sq_norms, mode);
}

struct OrthPenaltyFunction : public torch::autograd::Function<OrthPenaltyFunction> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList factors, at::IntArrayRef is_right,
                            c10::string_view mode) {
    auto [loss, dev, sq_norms] = call_forward(factors, is_right, mode);
    ctx->mark_non_differentiable({dev, sq_norms});
    variable_list saved{dev, sq_norms};
    saved.insert(saved.end(), factors.begin(), factors.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["is_right"] = is_right.vec();
    ctx->saved_data["mode"] = std::string(mode);
    return loss;
  }

  // One gradient per factor, then none for is_right and mode.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<at::Tensor> factors(saved.begin() + 2, saved.end());
    const std::vector<int64_t> is_right = ctx->saved_data["is_right"].toIntVector();
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    variable_list grads = call_backward(grad_outputs[0], factors, is_right, saved[0], saved[1], mode);
    grads.emplace_back();
    grads.emplace_back();
    return grads;
  }
};

at::Tensor orth_penalty(at::TensorList factors, at::IntArrayRef is_right, c10::string_view mode) {
  return OrthPenaltyFunction::apply(factors, is_right, mode);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adalora_fast, m) {
  m.def("orth_penalty(Tensor[] factors, int[] is_right, str mode) -> Tensor", &orth_penalty);
}

}  // namespace adalora_fast
