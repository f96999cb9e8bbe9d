// Host-side validation and planning of one multi-factor penalty call, shared by the CPU and CUDA builds.
//
// Every entry point validates all of its inputs here first, before it indexes a list, reads a pointer,
// takes a device guard or launches anything: a bad input ends in a TORCH_CHECK (a Python RuntimeError),
// never in undefined behaviour.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "orth_penalty.h"

namespace adalora_fast {

struct PenaltyPlan {
  std::vector<FactorView> factors;
  std::vector<WorkItem> items;
  int64_t partial_entries = 0;  // Σ n_chunks·r²
  int64_t dev_entries = 0;      // Σ r²
};

int parse_mode(c10::string_view mode);

// Validates the factors (at least one, one flag each, strided 2-D floating point, one dtype, one device) and
// lays out the workspaces and work items.
PenaltyPlan make_plan(at::TensorList factors, at::IntArrayRef is_right);

// Gradient tensors for the factors, with their addresses and strides entered in the plan.
std::vector<at::Tensor> allocate_gradients(PenaltyPlan& plan, at::TensorList factors, at::IntArrayRef is_right);

// Everything a backward needs before its launch: the plan (with gradient addresses) and the gradients.
struct BackwardSetup {
  int mode;
  PenaltyPlan plan;
  std::vector<at::Tensor> grads;
};
// Validates a backward call (the factors as make_plan does; grad_loss, deviation and sq_norms: floating point,
// on the factors' device, of the sizes the forward produced), then plans it.
BackwardSetup prepare_backward(const at::Tensor& grad_loss, at::TensorList factors, at::IntArrayRef is_right,
                               const at::Tensor& dev, const at::Tensor& sq_norms, c10::string_view mode);

// The accumulation dtype: float64 for float64 factors, float32 otherwise.
at::ScalarType accumulate_type(at::ScalarType t);

}  // namespace adalora_fast
