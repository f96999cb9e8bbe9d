// The fused layer as one C++ autograd node, its Triton launches replayed from C++ (launch programs).
//
// kernels/svd_adapter_op.py binds a layer call's launches once through Triton (kernels/launch.py) and describes
// them to a LaunchProgram: per launch the compiled function, its grid, block and shared memory, and its
// parameters, each a constant or the address of one of the call's tensors (a slot); per slot the sizes,
// strides and dtype every call must have. With a forward and a backward program,
//
//   adalora_fast::svd_linear_program(forward_program, backward_program, x, weight, bias, lora_A, lora_E, lora_B,
//                                    triplet_mask, ranknum, seed, fan_in_fan_out, scalars) -> Tensor[]
//
// (the programs by the handles LaunchProgram.register() gave them) is the layer's forward as one autograd node
// whose forward and backward run the frozen layer's ATen ops, the allocations and one cuLaunchKernelEx per
// kernel, with no Python between them (a backward handle of -1: the forward alone, for calls with nothing to
// differentiate). It returns [] when the programs do not apply to these tensors (a size,
// stride, dtype, device or 16-byte alignment differs from what the launches were specialised on, the float
// values their constants were made of, `scalars`, differ, or a handle is no longer registered): the caller
// then takes the Python path, which launches through Triton.
//
// The parameter buffer is what Triton's own launcher passes (its arguments in signature order without the
// constexprs, then the global and profile scratch pointers, null here), and the launch configuration is the
// one it makes for a kernel of one CTA per cluster without PDL or a cooperative grid; kernels/launch.py makes
// programs only for such kernels, on a Triton whose launcher it has checked (tests/launch_checks.py compares
// the two launches byte for byte on the fake driver's stub libcuda).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#if __has_include(<cuda.h>)
#include <cuda.h>
#include <dlfcn.h>
#define ADALORA_FAST_LAUNCH_PROGRAMS 1
#endif

#ifdef ADALORA_FAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include <atomic>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace adalora_fast {
namespace {

struct SlotSpec {
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
};

constexpr int64_t kConstant = 0;  // parameter kinds
constexpr int64_t kPointer = 1;

struct ParamSpec {
  int64_t kind;
  int64_t slot;   // kPointer: the slot whose address is passed
  int64_t bytes;  // kConstant: its size in bytes (1, 2, 4 or 8)
  uint64_t bits;  // kConstant: its value, little-endian in the low bytes
};

struct LaunchSpec {
  uint64_t function;
  unsigned grid[3];
  unsigned block;
  unsigned shared;
  std::vector<ParamSpec> params;
};

class LaunchProgram : public torch::CustomClassHolder {
 public:
  // slots: n, then per slot: dtype (c10::ScalarType), ndim, sizes..., strides...
  // launches: n, then per launch: function, grid x, y, z, block, shared, n params, per param: kind, slot or bytes, bits
  // scalars: the float values the constants were made of (scaling, dropout p), checked per call
  LaunchProgram(int64_t device_index, std::vector<int64_t> slots, std::vector<int64_t> launches,
                std::vector<double> scalars, bool with_dx)
      : device_index_(device_index), scalars_(std::move(scalars)), with_dx_(with_dx) {
    size_t at = 0;
    auto next = [&](const std::vector<int64_t>& table) {
      TORCH_CHECK(at < table.size(), "LaunchProgram: truncated table");
      return table[at++];
    };
    const int64_t n_slots = next(slots);
    for (int64_t s = 0; s < n_slots; ++s) {
      SlotSpec spec;
      spec.dtype = static_cast<at::ScalarType>(next(slots));
      const int64_t ndim = next(slots);
      for (int64_t d = 0; d < ndim; ++d) spec.sizes.push_back(next(slots));
      for (int64_t d = 0; d < ndim; ++d) spec.strides.push_back(next(slots));
      slots_.push_back(std::move(spec));
    }
    TORCH_CHECK(at == slots.size(), "LaunchProgram: slot table has trailing entries");
    at = 0;
    const int64_t n_launches = next(launches);
    for (int64_t l = 0; l < n_launches; ++l) {
      LaunchSpec spec;
      spec.function = static_cast<uint64_t>(next(launches));
      for (unsigned& g : spec.grid) g = static_cast<unsigned>(next(launches));
      spec.block = static_cast<unsigned>(next(launches));
      spec.shared = static_cast<unsigned>(next(launches));
      const int64_t n_params = next(launches);
      for (int64_t p = 0; p < n_params; ++p) {
        ParamSpec param;
        param.kind = next(launches);
        const int64_t slot_or_bytes = next(launches);
        param.bits = static_cast<uint64_t>(next(launches));
        if (param.kind == kPointer) {
          TORCH_CHECK(slot_or_bytes >= 0 && slot_or_bytes < n_slots, "LaunchProgram: parameter slot out of range");
          param.slot = slot_or_bytes;
          param.bytes = 8;
        } else {
          TORCH_CHECK(param.kind == kConstant && (slot_or_bytes == 1 || slot_or_bytes == 2 || slot_or_bytes == 4 ||
                                                  slot_or_bytes == 8),
                      "LaunchProgram: a parameter is a constant of 1, 2, 4 or 8 bytes or a slot's address");
          param.slot = -1;
          param.bytes = slot_or_bytes;
        }
        spec.params.push_back(param);
      }
      launches_.push_back(std::move(spec));
    }
    TORCH_CHECK(at == launches.size(), "LaunchProgram: launch table has trailing entries");
  }

  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }
  bool with_dx() const { return with_dx_; }  // a backward program's: made for calls that need dx
  int64_t num_launches() const { return static_cast<int64_t>(launches_.size()); }

  // Whether the tensor in slot `s` is laid out as the launches were specialised on (device checked by the caller).
  bool matches(int64_t s, const at::Tensor& t) const {
    const SlotSpec& spec = slots_[s];
    return t.defined() && t.scalar_type() == spec.dtype && t.sizes().equals(spec.sizes) &&
           t.strides().equals(spec.strides) && (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0;
  }

  bool scalars_match(const std::vector<double>& scalars) const { return scalars == scalars_; }
  at::ScalarType slot_dtype(int64_t s) const { return slots_[s].dtype; }

  bool on_device(const at::Tensor& t) const {
#ifdef ADALORA_FAST_WITH_CUDA
    return t.is_cuda() && t.get_device() == device_index_ && c10::cuda::current_device() == device_index_;
#else
    return t.is_cpu() && device_index_ == 0;  // the fake driver's device 0 (host-cost measurement, no GPU)
#endif
  }

  // t as slot `s` must be laid out: t itself, or a copy into a fresh tensor of the slot's layout (a tensor a
  // saved-tensor hook handed back laid out anew, in another dtype or unaligned). Sizes must be the slot's.
  at::Tensor as_slot(int64_t s, const at::Tensor& t, const at::TensorOptions& options) const {
    if (on_device(t) && matches(s, t)) return t;
    TORCH_CHECK(t.defined() && t.sizes().equals(slots_[s].sizes), "adalora_fast: the fused layer's backward got a "
                "tensor of other sizes than its forward saved (", t.sizes(), " for ", slots_[s].sizes, ")");
    at::Tensor out = allocate(s, options);
    out.copy_(t);
    return out;
  }

  // A fresh tensor for an output slot, laid out as the program's.
  at::Tensor allocate(int64_t s, const at::TensorOptions& options) const {
    const SlotSpec& spec = slots_[s];
    return at::empty_strided(spec.sizes, spec.strides, options.dtype(spec.dtype));
  }

  // Every launch, on the current stream, with the slots' addresses.
  void run(const std::vector<const at::Tensor*>& slot_tensors) const;

 private:
  int64_t device_index_;
  std::vector<SlotSpec> slots_;
  std::vector<LaunchSpec> launches_;
  std::vector<double> scalars_;
  bool with_dx_;
};

// Launches made by programs so far (what kernels/launch.py's launch_counts() reports as "program").
std::atomic<int64_t> program_launches{0};

#ifdef ADALORA_FAST_LAUNCH_PROGRAMS
struct Driver {
  using LaunchKernelEx = CUresult (*)(const CUlaunchConfig*, CUfunction, void**, void**);
  using GetErrorString = CUresult (*)(CUresult, const char**);
  using CtxGetCurrent = CUresult (*)(CUcontext*);
  using CtxSetCurrent = CUresult (*)(CUcontext);
  using DeviceGet = CUresult (*)(CUdevice*, int);
  using PrimaryCtxRetain = CUresult (*)(CUcontext*, CUdevice);
  LaunchKernelEx launch = nullptr;
  GetErrorString error_string = nullptr;
  CtxGetCurrent ctx_get_current = nullptr;
  CtxSetCurrent ctx_set_current = nullptr;
  DeviceGet device_get = nullptr;
  PrimaryCtxRetain primary_ctx_retain = nullptr;
};

// The process's libcuda (Triton's launcher has loaded it by the time a program exists).
const Driver& driver() {
  static const Driver d = [] {
    Driver out;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib != nullptr) {
      out.launch = reinterpret_cast<Driver::LaunchKernelEx>(dlsym(lib, "cuLaunchKernelEx"));
      out.error_string = reinterpret_cast<Driver::GetErrorString>(dlsym(lib, "cuGetErrorString"));
      out.ctx_get_current = reinterpret_cast<Driver::CtxGetCurrent>(dlsym(lib, "cuCtxGetCurrent"));
      out.ctx_set_current = reinterpret_cast<Driver::CtxSetCurrent>(dlsym(lib, "cuCtxSetCurrent"));
      out.device_get = reinterpret_cast<Driver::DeviceGet>(dlsym(lib, "cuDeviceGet"));
      out.primary_ctx_retain = reinterpret_cast<Driver::PrimaryCtxRetain>(dlsym(lib, "cuDevicePrimaryCtxRetain"));
    }
    return out;
  }();
  return d;
}

CUstream current_stream(int64_t device_index) {
#ifdef ADALORA_FAST_WITH_CUDA
  return c10::cuda::getCurrentCUDAStream(device_index).stream();
#else
  (void)device_index;
  return nullptr;  // the fake driver's stream 0
#endif
}

// The device's primary context made current where this thread has none (an autograd worker thread may not), as
// Triton's launcher does before each launch.
void ensure_context(const Driver& d, int64_t device_index) {
  if (d.ctx_get_current == nullptr || d.ctx_set_current == nullptr || d.device_get == nullptr ||
      d.primary_ctx_retain == nullptr) {
    return;
  }
  CUcontext ctx = nullptr;
  if (d.ctx_get_current(&ctx) == CUDA_SUCCESS && ctx != nullptr) return;
  CUdevice device;
  TORCH_CHECK(d.device_get(&device, static_cast<int>(device_index)) == CUDA_SUCCESS &&
                  d.primary_ctx_retain(&ctx, device) == CUDA_SUCCESS && d.ctx_set_current(ctx) == CUDA_SUCCESS,
              "adalora_fast: could not make device ", device_index, "'s CUDA context current");
}

void LaunchProgram::run(const std::vector<const at::Tensor*>& slot_tensors) const {
  const Driver& d = driver();
  TORCH_CHECK(d.launch != nullptr, "adalora_fast: cuLaunchKernelEx was not found in libcuda.so.1");
  ensure_context(d, device_index_);
  CUstream stream = current_stream(device_index_);
  constexpr size_t kMaxParams = 64;
  uint64_t storage[kMaxParams];
  void* params[kMaxParams];
  int64_t launched = 0;
  for (const LaunchSpec& launch : launches_) {
    const size_t n = launch.params.size();
    TORCH_CHECK(n <= kMaxParams, "adalora_fast: a kernel of more than ", kMaxParams, " parameters");
    for (size_t p = 0; p < n; ++p) {
      const ParamSpec& param = launch.params[p];
      storage[p] = param.kind == kPointer ? reinterpret_cast<uint64_t>(slot_tensors[param.slot]->data_ptr())
                                          : param.bits;
      params[p] = &storage[p];  // (little-endian: a constant's low bytes come first)
    }
    if (static_cast<uint64_t>(launch.grid[0]) * launch.grid[1] * launch.grid[2] == 0) continue;  // as Triton does
    CUlaunchConfig config;
    std::memset(&config, 0, sizeof(config));
    config.gridDimX = launch.grid[0];
    config.gridDimY = launch.grid[1];
    config.gridDimZ = launch.grid[2];
    config.blockDimX = launch.block;
    config.blockDimY = 1;
    config.blockDimZ = 1;
    config.sharedMemBytes = launch.shared;
    config.hStream = stream;
    config.attrs = nullptr;
    config.numAttrs = 0;
    const CUresult status = d.launch(&config, reinterpret_cast<CUfunction>(launch.function), params, nullptr);
    if (status != CUDA_SUCCESS) {
      const char* message = nullptr;
      if (d.error_string != nullptr) d.error_string(status, &message);
      TORCH_CHECK(false, "adalora_fast: cuLaunchKernelEx failed (", static_cast<int>(status), ": ",
                  message != nullptr ? message : "unknown error", ")");
    }
    ++launched;
  }
  program_launches.fetch_add(launched, std::memory_order_relaxed);
}
#else
void LaunchProgram::run(const std::vector<const at::Tensor*>&) const {
  TORCH_CHECK(false, "adalora_fast: this build has no launch programs (cuda.h was not found when it was built)");
}
#endif

using Program = c10::intrusive_ptr<LaunchProgram>;

// Programs by handle: the op takes handles (ints), not the script objects, since torch.ops looks for a
// __torch_function__ on every argument, which on a script object costs a thrown and caught C++ exception.
// Handles are never reused: one that outlived a clear names no program.
std::mutex registry_mutex;
std::unordered_map<int64_t, Program> registry;
int64_t next_handle = 0;

int64_t register_program(const Program& program) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.emplace(next_handle, program);
  return next_handle++;
}

Program registered(int64_t handle) {  // (null when no program has this handle)
  std::lock_guard<std::mutex> lock(registry_mutex);
  const auto found = registry.find(handle);
  return found == registry.end() ? Program() : found->second;
}

void clear_programs() {  // (a node still in a graph keeps its programs)
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.clear();
}

// Forward slots: x, lora_A, lora_E, lora_B, triplet_mask, ranknum, seed, H, y, and the base layer's output the
// adapter's term is added onto (the fused layer: y itself, its frozen GEMM's output; over any other base layer,
// that layer's output, read, and y a fresh tensor).
enum ForwardSlot { kFX, kFA, kFE, kFB, kFMask, kFRanknum, kFSeed, kFH, kFY, kFBase, kForwardSlots };
// Backward slots: dY, x, lora_A, lora_E, lora_B, triplet_mask, ranknum, H, seed, workspace, dA, dE, dB, dx (the
// seed's slot when dx is not needed: the kernel does not touch it then).
enum BackwardSlot { kBDy, kBX, kBA, kBE, kBB, kBMask, kBRanknum, kBH, kBSeed, kBWs, kBDa, kBDe, kBDb, kBDx, kBackwardSlots };

bool all_match(const LaunchProgram& program, std::initializer_list<std::pair<int64_t, const at::Tensor*>> tensors) {
  for (const auto& [slot, t] : tensors) {
    if (!program.on_device(*t) || !program.matches(slot, *t)) return false;
  }
  return true;
}

at::Tensor base_output(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool fan_in_fan_out) {
  if (fan_in_fan_out) return bias.has_value() ? at::addmm(*bias, x, weight) : x.mm(weight);
  return at::linear(x, weight, bias);
}

struct ForwardOutputs {
  at::Tensor x, y, h;  // x as rows, y (rows × out), H
};

// The forward's work: the frozen layer's output, then the forward program's launches add the adapter's term.
ForwardOutputs run_forward(const LaunchProgram& program, const at::Tensor& x2d, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_E,
                           const at::Tensor& lora_B, const at::Tensor& mask, const at::Tensor& ranknum,
                           const at::Tensor& seed, bool fan_in_fan_out) {
  ForwardOutputs out;
  out.x = x2d;
  out.y = base_output(out.x, weight, bias, fan_in_fan_out);
  TORCH_CHECK(program.matches(kFY, out.y), "adalora_fast: the frozen layer's output is not laid out as the "
              "forward program's (a program is made for a dense output)");
  out.h = program.allocate(kFH, out.x.options());
  program.run({&out.x, &lora_A, &lora_E, &lora_B, &mask, &ranknum, &seed, &out.h, &out.y, &out.y});
  return out;
}

// Over any other base layer: y = its output + the adapter's term, in a fresh tensor.
ForwardOutputs run_add_forward(const LaunchProgram& program, const at::Tensor& x2d, const at::Tensor& result2d,
                               const at::Tensor& lora_A, const at::Tensor& lora_E, const at::Tensor& lora_B,
                               const at::Tensor& mask, const at::Tensor& ranknum, const at::Tensor& seed) {
  ForwardOutputs out;
  out.x = x2d;
  out.y = program.allocate(kFY, result2d.options());
  out.h = program.allocate(kFH, x2d.options());
  program.run({&out.x, &lora_A, &lora_E, &lora_B, &mask, &ranknum, &seed, &out.h, &out.y, &result2d});
  return out;
}

// The saved tensors of either node, as the backward program's slots take them: each as the saved-tensor hooks
// hand it back, copied into the program's layout where it is not laid out so (the layout, alignment, dtype or
// device a hook chose).
struct BackwardInputs {
  at::Tensor dy, x, lora_A, lora_E, lora_B, h, mask, ranknum, seed;
};

BackwardInputs backward_inputs(const LaunchProgram& program, torch::autograd::AutogradContext* ctx,
                               const at::Tensor& dy_nd, const torch::autograd::variable_list& saved) {
  const at::TensorOptions options = dy_nd.options();  // (the device the layer ran on)
  BackwardInputs in;
  in.dy = program.as_slot(kBDy, dy_nd.dim() == 2 ? dy_nd : dy_nd.reshape({-1, dy_nd.size(-1)}), options);
  in.x = program.as_slot(kBX, saved[0], options);
  in.lora_A = program.as_slot(kBA, saved[1], options);
  in.lora_E = program.as_slot(kBE, saved[2], options);
  in.lora_B = program.as_slot(kBB, saved[3], options);
  in.h = program.as_slot(kBH, saved[4], options);
  in.mask = program.as_slot(kBMask, ctx->saved_data["mask"].toTensor(), options);
  in.ranknum = program.as_slot(kBRanknum, ctx->saved_data["ranknum"].toTensor(), options);
  in.seed = program.as_slot(kBSeed, ctx->saved_data["seed"].toTensor(), options);
  return in;
}

struct AdapterGrads {
  at::Tensor d_a, d_e, d_b;
};

// The backward program's launches: dA, dE, dB, and the adapter's dx written into (or added onto) dx, the seed's
// slot when no dx is needed.
AdapterGrads run_backward(const LaunchProgram& program, const BackwardInputs& in, const at::Tensor& dx) {
  const at::TensorOptions options = in.dy.options();
  at::Tensor ws = program.allocate(kBWs, options);
  AdapterGrads g{program.allocate(kBDa, options), program.allocate(kBDe, options), program.allocate(kBDb, options)};
  program.run({&in.dy, &in.x, &in.lora_A, &in.lora_E, &in.lora_B, &in.mask, &in.ranknum, &in.h, &in.seed, &ws,
               &g.d_a, &g.d_e, &g.d_b, &dx});
  return g;
}

void save_adapter_state(torch::autograd::AutogradContext* ctx, const at::Tensor& mask, const at::Tensor& ranknum,
                        const at::Tensor& seed, const c10::intrusive_ptr<LaunchProgram>& backward_program) {
  ctx->saved_data["mask"] = mask;  // buffers nothing changes inside a step: kept as they are, as in Python
  ctx->saved_data["ranknum"] = ranknum;
  ctx->saved_data["seed"] = seed;
  ctx->saved_data["program"] = backward_program;
}

// y in x's leading dimensions.
at::Tensor unflatten_output(const at::Tensor& y, const at::Tensor& x_nd) {
  if (x_nd.dim() == 2) return y;
  std::vector<int64_t> sizes(x_nd.sizes().begin(), x_nd.sizes().end());
  sizes.back() = y.size(1);
  return y.view(sizes);
}

// The fused layer y = x·W0ᵀ + b + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ as one C++ autograd node: the frozen GEMMs on
// ATen, the adapter's kernels through the programs. Inputs: x, weight, bias, lora_A, lora_E, lora_B, then what
// is not differentiated (the mask, ranknum and seed tensors, the two programs, fan_in_fan_out).
struct SVDLinearProgramFunction : public torch::autograd::Function<SVDLinearProgramFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_nd,
                                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                const at::Tensor& lora_A, const at::Tensor& lora_E,
                                                const at::Tensor& lora_B, const at::Tensor& mask,
                                                const at::Tensor& ranknum, const at::Tensor& seed,
                                                const Program& forward_program, const Program& backward_program,
                                                bool fan_in_fan_out) {
    // (x of any rank: flattened to rows here, where no autograd node records the reshape; a view for the
    // layouts a program takes)
    const at::Tensor x2d = x_nd.dim() == 2 ? x_nd : x_nd.reshape({-1, x_nd.size(-1)});
    const ForwardOutputs out = run_forward(*forward_program, x2d, weight, bias, lora_A, lora_E, lora_B, mask,
                                           ranknum, seed, fan_in_fan_out);
    ctx->save_for_backward({out.x, lora_A, lora_E, lora_B, out.h, weight});
    save_adapter_state(ctx, mask, ranknum, seed, backward_program);
    // what the backward needs to know, in one int: dx, dW (a trainable base: unusual for AdaLoRA), db,
    // fan_in_fan_out; and x's sizes (dx takes them)
    ctx->saved_data["flags"] = static_cast<int64_t>(x_nd.requires_grad()) | (weight.requires_grad() << 1) |
                               ((bias.has_value() && bias->requires_grad()) << 2) | (fan_in_fan_out << 3);
    ctx->saved_data["x_sizes"] = x_nd.sizes();
    return {unflatten_output(out.y, x_nd)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();  // (checks each for an in-place change since the forward)
    const auto program = ctx->saved_data["program"].toCustomClass<LaunchProgram>();
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const bool needs_dx = flags & 1, needs_weight = flags & 2, needs_bias = flags & 4, fan_in_fan_out = flags & 8;
    const BackwardInputs in = backward_inputs(*program, ctx, grads[0], saved);
    const at::Tensor& weight = saved[5];  // (read by ATen alone: any layout)
    at::Tensor dx = in.seed;
    if (needs_dx) {  // the frozen layer's dY·W0, onto which the adapter's dx is added
      dx = program->as_slot(kBDx, in.dy.mm(fan_in_fan_out ? weight.t() : weight), in.dy.options());
    }
    const AdapterGrads g = run_backward(*program, in, dx);
    at::Tensor d_w, d_bias;
    if (needs_weight) {
      d_w = in.dy.t().mm(in.x);
      if (fan_in_fan_out) d_w = d_w.t();
    }
    if (needs_bias) d_bias = in.dy.sum(0);
    if (needs_dx && grads[0].dim() != 2) dx = dx.view(ctx->saved_data["x_sizes"].toIntVector());
    // one gradient per forward input: x, weight, bias, A, E, B, then the rest (not differentiated)
    return {needs_dx ? dx : at::Tensor(), d_w, d_bias, g.d_a, g.d_e, g.d_b, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The programs a call names by handle (a backward handle of -1: none, the forward alone), or nothing when they do
// not apply: a handle no longer registered, scalars other than theirs, or x needing dx where the backward program
// was made without (or the reverse). A forward alone is for calls with nothing to differentiate.
struct CallPrograms {
  Program forward, backward;
  bool forward_only;
};

std::optional<CallPrograms> call_programs(const char* op, int64_t forward_handle, int64_t backward_handle,
                                          const std::vector<double>& scalars, bool x_requires_grad,
                                          bool differentiable) {
  CallPrograms p{registered(forward_handle), Program(), backward_handle == -1};
  if (!p.forward_only) p.backward = registered(backward_handle);
  if (!p.forward || (!p.forward_only && !p.backward)) return std::nullopt;
  TORCH_CHECK(p.forward->num_slots() == kForwardSlots && (p.forward_only || p.backward->num_slots() == kBackwardSlots),
              op, ": not a forward and a backward program");
  TORCH_CHECK(!(p.forward_only && at::GradMode::is_enabled() && differentiable), op, ": a call without a backward "
              "program on tensors that need gradients (forward-only calls are for no_grad and inference)");
  if (!p.forward->scalars_match(scalars) ||
      (!p.forward_only && (x_requires_grad != p.backward->with_dx() || !p.backward->scalars_match(scalars)))) {
    return std::nullopt;
  }
  return p;
}

// [y] for an x of rank >= 2, or [] when the programs do not apply to these tensors (the caller takes the Python path).
// A backward handle of -1: a call with nothing to differentiate (no_grad, inference), the forward alone.
std::vector<at::Tensor> svd_linear_program(int64_t forward_handle, int64_t backward_handle,
                                           const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                           const at::Tensor& lora_E, const at::Tensor& lora_B, const at::Tensor& mask,
                                           const at::Tensor& ranknum, const at::Tensor& seed, bool fan_in_fan_out,
                                           std::vector<double> scalars) {
  const bool differentiable = x.requires_grad() || weight.requires_grad() ||
                              (bias.has_value() && bias->requires_grad()) || lora_A.requires_grad() ||
                              lora_E.requires_grad() || lora_B.requires_grad();
  const auto programs = call_programs("svd_linear_program", forward_handle, backward_handle, scalars,
                                      x.requires_grad(), differentiable);
  if (!programs || x.dim() < 2 || !programs->forward->on_device(weight)) return {};
  const Program& forward_program = programs->forward;
  const bool forward_only = programs->forward_only;
  const at::Tensor x2d = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});  // (a view: no copy for these layouts)
  if (!all_match(*forward_program, {{kFX, &x2d}, {kFA, &lora_A}, {kFE, &lora_E}, {kFB, &lora_B}, {kFMask, &mask},
                                    {kFRanknum, &ranknum}, {kFSeed, &seed}})) {
    return {};
  }
  if (forward_only) {
    const ForwardOutputs out = run_forward(*forward_program, x2d, weight, bias, lora_A, lora_E, lora_B, mask, ranknum,
                                           seed, fan_in_fan_out);
    return {unflatten_output(out.y, x)};
  }
  return SVDLinearProgramFunction::apply(x, weight, bias, lora_A, lora_E, lora_B, mask, ranknum, seed,
                                         forward_program, programs->backward, fan_in_fan_out);
}

// Over any other base layer (bitsandbytes, GPTQ, an nn.Linear subclass): y = result + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ
// as one C++ autograd node; the base layer's own autograd gives its part of dx, this node the adapter's (into a
// fresh tensor), dA, dE and dB, and dresult = dY in result's dtype. Inputs: result, x, lora_A, lora_E, lora_B,
// then what is not differentiated (mask, ranknum, seed, the two programs).
struct SVDAdapterAddProgramFunction : public torch::autograd::Function<SVDAdapterAddProgramFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& result,
                                                const at::Tensor& x_nd, const at::Tensor& lora_A,
                                                const at::Tensor& lora_E, const at::Tensor& lora_B,
                                                const at::Tensor& mask, const at::Tensor& ranknum,
                                                const at::Tensor& seed, const Program& forward_program,
                                                const Program& backward_program) {
    const at::Tensor x2d = x_nd.dim() == 2 ? x_nd : x_nd.reshape({-1, x_nd.size(-1)});
    const at::Tensor result2d = result.reshape({x2d.size(0), result.size(-1)});
    const ForwardOutputs out =
        run_add_forward(*forward_program, x2d, result2d, lora_A, lora_E, lora_B, mask, ranknum, seed);
    ctx->save_for_backward({out.x, lora_A, lora_E, lora_B, out.h});
    save_adapter_state(ctx, mask, ranknum, seed, backward_program);
    ctx->saved_data["flags"] = static_cast<int64_t>(result.requires_grad()) | (x_nd.requires_grad() << 1);
    ctx->saved_data["x_sizes"] = x_nd.sizes();
    ctx->saved_data["result_dtype"] = static_cast<int64_t>(result.scalar_type());
    return {out.y.view(result.sizes())};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto program = ctx->saved_data["program"].toCustomClass<LaunchProgram>();
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const bool needs_result = flags & 1, needs_dx = flags & 2;
    const BackwardInputs in = backward_inputs(*program, ctx, grads[0], saved);
    const at::Tensor dx = needs_dx ? program->allocate(kBDx, in.dy.options()) : in.seed;
    const AdapterGrads g = run_backward(*program, in, dx);
    at::Tensor d_result;
    if (needs_result) d_result = grads[0].to(static_cast<at::ScalarType>(ctx->saved_data["result_dtype"].toInt()));
    return {d_result, needs_dx ? dx.view(ctx->saved_data["x_sizes"].toIntVector()) : at::Tensor(), g.d_a, g.d_e,
            g.d_b, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// [result + the adapter's term] as the node (or, with a backward handle of -1, without one), or [] when the
// programs do not apply (the caller takes the Python path).
std::vector<at::Tensor> svd_adapter_add_program(int64_t forward_handle, int64_t backward_handle,
                                                const at::Tensor& result, const at::Tensor& x,
                                                const at::Tensor& lora_A, const at::Tensor& lora_E,
                                                const at::Tensor& lora_B, const at::Tensor& mask,
                                                const at::Tensor& ranknum, const at::Tensor& seed,
                                                at::ScalarType out_dtype, std::vector<double> scalars) {
  const bool differentiable = result.requires_grad() || x.requires_grad() || lora_A.requires_grad() ||
                              lora_E.requires_grad() || lora_B.requires_grad();
  const auto programs = call_programs("svd_adapter_add_program", forward_handle, backward_handle, scalars,
                                      x.requires_grad(), differentiable);
  if (!programs || x.dim() < 2 || result.dim() < 1 || programs->forward->slot_dtype(kFY) != out_dtype) return {};
  const Program& forward_program = programs->forward;
  const bool forward_only = programs->forward_only;
  const at::Tensor x2d = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
  if (result.numel() != x2d.size(0) * result.size(-1)) return {};  // (the Python path says what is wrong)
  const at::Tensor result2d = result.reshape({x2d.size(0), result.size(-1)});
  if (!all_match(*forward_program, {{kFX, &x2d}, {kFBase, &result2d}, {kFA, &lora_A}, {kFE, &lora_E},
                                    {kFB, &lora_B}, {kFMask, &mask}, {kFRanknum, &ranknum}, {kFSeed, &seed}})) {
    return {};
  }
  if (forward_only) {
    const ForwardOutputs out =
        run_add_forward(*forward_program, x2d, result2d, lora_A, lora_E, lora_B, mask, ranknum, seed);
    return {out.y.view(result.sizes())};
  }
  return SVDAdapterAddProgramFunction::apply(result, x, lora_A, lora_E, lora_B, mask, ranknum, seed, forward_program,
                                             programs->backward);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adalora_fast, m) {
  m.class_<LaunchProgram>("LaunchProgram")
      .def(torch::init<int64_t, std::vector<int64_t>, std::vector<int64_t>, std::vector<double>, bool>())
      .def("num_slots", &LaunchProgram::num_slots)
      .def("num_launches", &LaunchProgram::num_launches)
      .def("register", [](const Program& self) { return register_program(self); });
  m.def("clear_launch_programs() -> ()", &clear_programs);
  m.def("launch_program_launches() -> int",
        [] { return program_launches.load(std::memory_order_relaxed); });
  m.def(
      "svd_linear_program(int forward_program, int backward_program, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor lora_A, Tensor lora_E, Tensor lora_B, Tensor triplet_mask, Tensor ranknum, Tensor seed, "
      "bool fan_in_fan_out, float[] scalars) -> Tensor[]",
      &svd_linear_program);
  m.def(
      "svd_adapter_add_program(int forward_program, int backward_program, Tensor result, Tensor x, Tensor lora_A, "
      "Tensor lora_E, Tensor lora_B, Tensor triplet_mask, Tensor ranknum, Tensor seed, ScalarType out_dtype, "
      "float[] scalars) -> Tensor[]",
      &svd_adapter_add_program);
}

}  // namespace adalora_fast
