"""One-line switch of PEFT's AdaLoRA onto adalora-fast.

``patch_peft()`` makes every PEFT AdaLoRA model created afterwards use

* the fast layer: each of PEFT's AdaLoRA linear layers (``SVDLinear``; bitsandbytes' ``SVDLinear4bit`` and
  ``SVDLinear8bitLt``; GPTQ's ``SVDQuantLinear``) becomes its ``FastPeft…`` subclass (:class:`FastPeftLayer`),
  whose forward runs the adapter on :mod:`adalora_fast.dispatch`'s choice (the fused kernels on a GPU, the
  reference elsewhere): over an ``nn.Linear`` the fused op with the base GEMM, over any other base the
  adapter's term added onto the base layer's output;
* the fast allocator: ``AdaLoraModel.update_and_allocate`` runs :class:`adalora_fast.RankAllocator`
  (``semantics="peft"``: the same masks step for step) on flat state, with no host syncs;
  ``peft_config.rank_pattern`` is written when it is needed (at T − tfinal and on save), not every step;
* the fast penalty in ``AdaLoraModel.forward``.

``unpatch_peft()`` undoes it; ``patch_peft(peft_model)`` converts an existing model in place, keeping its
weights, masks and allocator state.

``capturable=True`` makes the allocator graph-safe (``RankAllocator(capturable=True)``), so that a whole
training step can be captured as a CUDA graph (:func:`adalora_fast.cuda_graph.capture_training_step`). Its
device step counter starts at the first ``global_step`` passed to ``update_and_allocate``, and
``peft_config.rank_pattern`` is written on save or by :func:`sync_rank_pattern` (reading it inside the
step would read the device).

Where PEFT's behaviour is a known bug, the patched path does the right thing: the orthogonality penalty is
added also when ``task_type`` is None (plain ``PeftModel.forward`` bypasses ``AdaLoraModel.forward``), and
a final phase reached without an earlier mask computes one instead of crashing. For the Trainer, which
never calls ``update_and_allocate``, use :class:`adalora_fast.integrations.trainer.AdaLoraCallback`.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import dispatch
from ..adapter import SVDAdapter, check_input_dtype
from ..allocator import RankAllocator
from ..penalty import orth_penalty

_ORIGINALS: dict[str, object] = {}
_OPTIONS = {"capturable": False}  # of the global patch, for allocators made while it is on


def _peft():
    from peft import PeftModel
    from peft.tuners.adalora import AdaLoraModel, SVDLinear

    return PeftModel, AdaLoraModel, SVDLinear


def peft_layer_classes() -> tuple[type, ...]:
    """PEFT's AdaLoRA layer classes for linear bases that this PEFT and its quantization backends provide:
    ``SVDLinear`` (``nn.Linear`` and its subclasses), ``SVDLinear8bitLt`` and ``SVDLinear4bit``
    (bitsandbytes), ``SVDQuantLinear`` (GPTQ)."""
    import peft.tuners.adalora as adalora

    names = ("SVDLinear", "SVDLinear8bitLt", "SVDLinear4bit", "SVDQuantLinear")
    return tuple(cls for cls in (getattr(adalora, name, None) for name in names) if cls is not None)


def _output_dtype_in_place(result: torch.Tensor, ranknum: torch.Tensor) -> torch.dtype:
    """SVDLinear, SVDLinear4bit, SVDQuantLinear: ``result += term`` keeps the base output's dtype."""
    return result.dtype


def _output_dtype_8bit(result: torch.Tensor, ranknum: torch.Tensor) -> torch.dtype:
    """SVDLinear8bitLt: ``result + term * scaling / (ranknum + 1e-5)`` out of place, where the term has
    the base output's dtype (CUDA autocast's, under it) and dividing by the (1,)-shaped ranknum promotes it."""
    term = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled() else result.dtype
    return torch.promote_types(torch.promote_types(result.dtype, term), ranknum.dtype)


# What each of PEFT's layer classes does that the fast layer must do alike: the rule of its output's dtype,
# and whether PEFT can merge the adapter into that base.
_OUTPUT_DTYPE = {"SVDLinear8bitLt": _output_dtype_8bit}
_MERGES = ("SVDLinear",)


def _dense_linear(base: nn.Module) -> bool:
    """A plain ``nn.Linear`` with a dense floating weight: the fused path computes its GEMM itself."""
    if type(base) is not nn.Linear:
        return False
    weight = base._parameters["weight"]
    return type(weight) is nn.Parameter and weight.is_floating_point()


def _the_active_adapter(layer, state: dict, adapters: dict) -> str | None:
    """The one active adapter of a PEFT layer that holds it, or None where PEFT's own forward must run
    (adapters disabled or merged, none or several active here)."""
    try:
        active, disabled, merged = state["_active_adapter"], state["_disable_adapters"], state["merged_adapters"]
    except KeyError:  # another PEFT's attribute names: its public properties
        active, disabled, merged = layer.active_adapters, layer.disable_adapters, layer.merged_adapters
    if disabled or merged:
        return None
    if isinstance(active, str):
        return active if active in adapters else None
    held = [a for a in active if a in adapters]
    return held[0] if len(held) == 1 else None


class FastPeftLayer:
    """adalora-fast's forward for one of PEFT's AdaLoRA layer classes (mixed in before it): same parameters,
    state dict and repr. Over a plain ``nn.Linear`` the fused op computes the base GEMM too
    (:func:`~adalora_fast.dispatch.svd_adapter_linear`); over any other base (bitsandbytes 4-/8-bit, GPTQ,
    an ``nn.Linear`` subclass or a quantized weight) the base layer computes its output and the adapter's
    kernels add their term onto it (:func:`~adalora_fast.dispatch.svd_adapter_add`), with the output dtype
    of PEFT's own class. Anything else (adapters disabled or merged, several active adapters) runs PEFT's
    forward."""

    _output_dtype = staticmethod(_output_dtype_in_place)
    _peft_name = "SVDLinear"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # PEFT's state read from the instance's dicts: its properties and nn.Module's attribute lookup cost a
        # Python call per name, and a model has ~150 of these layers.
        state = self.__dict__
        modules = state["_modules"]
        a = _the_active_adapter(self, state, modules["lora_A"]._parameters)
        if a is None:
            return super().forward(x, *args, **kwargs)
        dropout = modules["lora_dropout"]._modules[a]
        adapter = SVDAdapter(
            lora_A=modules["lora_A"]._parameters[a], lora_E=modules["lora_E"]._parameters[a],
            lora_B=modules["lora_B"]._parameters[a], triplet_mask=None, scaling=float(state["scaling"][a]),
            ranknum=modules["ranknum"]._parameters[a],
            dropout_p=dropout.p if state["training"] and type(dropout) is nn.Dropout else 0.0,
        )  # fmt: skip
        base = modules["base_layer"]  # (PEFT's forward calls it, not get_base_layer())
        if not (args or kwargs) and _dense_linear(base):
            weight = base._parameters["weight"]
            check_input_dtype(x, weight)
            return dispatch.svd_adapter_linear(x, weight, base._parameters["bias"], adapter)
        result = base(x, *args, **kwargs)
        return dispatch.svd_adapter_add(result, x, adapter, self._output_dtype(result, adapter.ranknum))

    def merge(self, *args, **kwargs):
        if self._peft_name not in _MERGES:
            raise NotImplementedError(
                f"PEFT's AdaLoRA cannot merge an adapter into this base layer ({self._peft_name} over "
                f"{type(self.get_base_layer()).__name__}): merge_and_unload needs a dense base. Save the adapter "
                "(save_pretrained) and merge it into the unquantized model instead"
            )
        return super().merge(*args, **kwargs)


_FAST_LAYERS: dict[type, type] = {}


def fast_layer_class(peft_class: type | None = None) -> type:
    """The fast subclass of one of PEFT's AdaLoRA layer classes (default: ``SVDLinear``), made once."""
    if peft_class is None:
        peft_class = _peft()[2]
    fast = _FAST_LAYERS.get(peft_class)
    if fast is None:
        name = peft_class.__name__
        body = {"_peft_name": name, "__doc__": f"PEFT's {name} with adalora-fast's forward (see FastPeftLayer)."}
        if name in _OUTPUT_DTYPE:
            body["_output_dtype"] = staticmethod(_OUTPUT_DTYPE[name])
        fast = _FAST_LAYERS[peft_class] = type(f"FastPeft{name}", (FastPeftLayer, peft_class), body)
    return fast


def _convert_layer(module: nn.Module) -> None:
    """Give one of PEFT's AdaLoRA layers the fast forward, in place."""
    if type(module) in peft_layer_classes():
        module.__class__ = fast_layer_class(type(module))


# ---------------------------------------------------------------------------------------------
# What adalora-fast keeps on a PEFT model
# ---------------------------------------------------------------------------------------------


@dataclass
class FastState:
    """adalora-fast's state on one AdaLoraModel (its one attribute there, ``_adalora_fast``)."""

    allocator: RankAllocator | None = None  # made at the first update_and_allocate
    capturable: bool | None = None  # chosen by patch_peft(model); None: the global patch's option
    import_pending: bool = False  # a model converted in place: PEFT's scores and masks go into the allocator
    counter_set: bool = False  # capturable: the device step counter has taken the caller's first step
    layers: list | None = None  # the adapted modules, for the penalty
    # How many times the Trainer counts a term added to a step's loss normalised over the step's tokens
    # (accumulation steps × ranks; set by AdaLoraCallback): the penalty is divided by it (see fast_forward).
    trainer_loss_scale: int = 1
    # A Trainer checkpoint is being saved (set by AdaLoraCallback): the adapter is saved at full rank, with no
    # rank pattern, so that the Trainer can load it back into the full-rank model it resumes.
    saving_checkpoint: bool = False


def fast_state(model, create: bool = False) -> FastState | None:
    """adalora-fast's state on an AdaLoraModel (None where it has none, unless ``create``)."""
    state = getattr(model, "_adalora_fast", None)
    if state is None and create:
        state = model._adalora_fast = FastState()
    return state


def fast_allocator(model, create: bool = False) -> RankAllocator | None:
    """The adalora-fast allocator of an AdaLoraModel (``peft_model.base_model``); None before its first
    ``update_and_allocate`` (or, under ZeRO, its first training forward), unless ``create`` makes it now
    (after the model is on its device and under its engine: e.g. to ``load_state_dict`` when resuming)."""
    if create:
        return _allocator(model)
    state = fast_state(model)
    return state.allocator if state is not None else None


# ---------------------------------------------------------------------------------------------
# The patched AdaLoraModel methods
# ---------------------------------------------------------------------------------------------


def _allocator(self) -> RankAllocator:
    """The AdaLoraModel's adalora-fast allocator, made on first use (after any load-time resize, and where
    the model is then: ``patch_peft(model).cuda()`` works); a model converted in place brings PEFT's scores."""
    fast = fast_state(self, create=True)
    alloc = fast.allocator
    if alloc is not None:
        lam, state = alloc.triplets[0].lora_E, alloc.state
        if (lam.device, lam.dtype) != (state.device, state.dtype):
            raise RuntimeError(
                f"the adapters are {lam.dtype} on {lam.device} but the adalora-fast allocator was made for "
                f"{state.dtype} on {state.device}; move or cast the model before its first update_and_allocate"
            )
    if alloc is None:
        cfg = self.peft_config[self.trainable_adapter_name]
        alloc = RankAllocator(
            self.model, lora_r=cfg.init_r, target_rank=cfg.target_r, init_warmup=cfg.tinit, final_warmup=cfg.tfinal,
            mask_interval=cfg.deltaT, beta1=cfg.beta1, beta2=cfg.beta2, total_step=cfg.total_step,
            adapter_name=self.trainable_adapter_name, semantics="peft",
            capturable=_OPTIONS["capturable"] if fast.capturable is None else fast.capturable,
        )  # fmt: skip
        fast.allocator = alloc
        if fast.import_pending:
            _import_peft_allocator_state(self, alloc)
            fast.import_pending = False
    return alloc


def fast_update_and_allocate(self, global_step: int) -> None:
    """PEFT's ``update_and_allocate`` on adalora-fast's allocator (same masks, no per-module syncs)."""
    alloc = _allocator(self)
    if alloc.capturable:
        fast = fast_state(self)
        if not fast.counter_set:
            alloc.set_step(global_step)  # the device counter takes over from the caller's step number
            fast.counter_set = True
        alloc.update_and_mask(None, None)  # the phase is chosen on the device; rank_pattern is synced on save
        return
    alloc.update_and_mask(None, global_step)
    if global_step == alloc.schedule.final_start:
        # the final pattern, once (PEFT writes it at every mask)
        self.peft_config[self.trainable_adapter_name].rank_pattern = alloc.rank_pattern


def sync_rank_pattern(model) -> None:
    """Write the allocator's current pattern into ``peft_config.rank_pattern`` (what save and resize read)."""
    alloc = fast_allocator(model)
    if alloc is not None and alloc.rank_pattern is not None:
        model.peft_config[model.trainable_adapter_name].rank_pattern = alloc.rank_pattern


def _orth_factors(self) -> tuple[list[torch.Tensor], list[bool]]:
    """Every lora_A and lora_B of the trainable adapter, in PEFT's order (A then B per module).

    The adapted modules are found once and cached (PEFT walks every named parameter on every forward);
    the parameters are read from them on each call, so a load-time resize is picked up.
    """
    from peft.tuners.adalora import AdaLoraLayer

    name = self.trainable_adapter_name
    fast = fast_state(self, create=True)
    modules = fast.layers
    if modules is not None:
        try:
            return _factors_of(modules, name), [True, False] * len(modules)
        except KeyError:  # a layer lost the adapter: walk the model again
            pass
    modules = fast.layers = [m for m in self.model.modules() if isinstance(m, AdaLoraLayer) and name in m.lora_A]
    return _factors_of(modules, name), [True, False] * len(modules)


def _factors_of(modules, name: str) -> list[torch.Tensor]:
    """lora_A, lora_B of adapter ``name`` per module (KeyError where one lacks it), read from the layers' dicts:
    ``m.lora_A`` is an nn.Module attribute lookup and ``name in`` a ParameterDict a Python call, each, on ~150
    layers per step."""
    return [p for m in modules
            for p in (m._modules["lora_A"]._parameters[name], m._modules["lora_B"]._parameters[name])]  # fmt: skip


def _under_zero(self) -> bool:
    """Whether DeepSpeed ZeRO manages the trainable adapter's parameters."""
    from .deepspeed import zero_stage

    factors, _ = _orth_factors(self)
    return bool(factors) and zero_stage(factors[0]) is not None


def fast_forward(self, *args, **kwargs):
    """``AdaLoraModel.forward``: the model's outputs, plus ``orth_reg_weight ·`` the mean penalty on the loss."""
    outputs = self.model.forward(*args, **kwargs)
    trainable = hasattr(self, "trainable_adapter_name")  # absent when every adapter is in inference mode
    if trainable and self.training and fast_state(self, create=True).allocator is None and _under_zero(self):
        _allocator(self)  # before the first step: under ZeRO the allocator takes each step's gradient in the step
    if trainable and getattr(outputs, "loss", None) is not None and isinstance(outputs.loss, torch.Tensor):
        weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
        if weight < 0:
            raise ValueError("orth_reg_weight should be greater than or equal to 0. ")
        if weight > 0:  # (the adapted modules are not walked when the penalty is off)
            factors, right = _orth_factors(self)
            if factors:
                # Given num_items_in_batch, the model's loss is a sum over the step's tokens divided by their
                # count: the Trainer sums it over the accumulated micro-batches and multiplies it by the number
                # of ranks; a term added here would weigh that many times: divide it back.
                fast = fast_state(self)
                if kwargs.get("num_items_in_batch") is not None and fast is not None and fast.trainer_loss_scale != 1:
                    weight = weight / fast.trainer_loss_scale
                outputs.loss += weight * orth_penalty(factors, right)
    return outputs


def _through_adalora_forward(self, *args, **kwargs):
    """Plain ``PeftModel.forward``, but through ``AdaLoraModel.forward`` (PEFT calls the raw model and skips the penalty)."""
    with self._enable_peft_forward_hooks(*args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
        return self.base_model(*args, **kwargs)


def _peft_model_forward(self, *args, **kwargs):
    _, AdaLoraModel, _ = _peft()
    if isinstance(self.base_model, AdaLoraModel) and hasattr(self.base_model, "trainable_adapter_name"):
        return _through_adalora_forward(self, *args, **kwargs)
    return _ORIGINALS["PeftModel.forward"](self, *args, **kwargs)


def _check_whole(model, state_dict, adapter_name) -> None:
    """Saving resizes every adapter by the rank pattern: its tensors must be whole, not ZeRO-3 partitions."""
    from .deepspeed import zero_stage

    for name, p in model.named_parameters():
        if f"lora_E.{adapter_name}" in name and zero_stage(p) == 3:
            saved = state_dict.get(name, p)
            if saved.numel() != p.ds_numel:
                raise RuntimeError(
                    f"{name} is partitioned by ZeRO-3 ({saved.numel()} of its {p.ds_numel} elements here): save a "
                    "gathered state dict, as the Trainer does with \"stage3_gather_16bit_weights_on_model_save\": true "
                    "(state_dict=engine._zero3_consolidated_16bit_state_dict() on every rank, then save_pretrained("
                    "..., state_dict=...) on rank 0), or save inside deepspeed.zero.GatheredParameters on every rank"
                )
            return


def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
    fast = fast_state(model)
    if fast is not None and fast.saving_checkpoint:
        config.rank_pattern = None  # (not resized: the masks are in Λ, and the allocator's state beside it)
    else:
        sync_rank_pattern(model)  # the lazily kept pattern is what the saved, resized adapter must carry
        _check_whole(model, state_dict, adapter_name)
    return _ORIGINALS["AdaLoraModel._get_adapter_state_dict"].__func__(
        cls, model, config, adapter_name, state_dict, unwanted_adapter_names
    )


def _create_new_module(lora_config, adapter_name, target, device_map=None, **kwargs):
    create = _ORIGINALS["AdaLoraModel._create_new_module"].__func__
    module = create(lora_config, adapter_name, target, device_map=device_map, **kwargs)
    _convert_layer(module)
    return module


# ---------------------------------------------------------------------------------------------
# patch / unpatch
# ---------------------------------------------------------------------------------------------


def patch_peft(peft_model=None, *, capturable: bool = False):
    """Switch PEFT's AdaLoRA onto adalora-fast: for every model created afterwards, or for ``peft_model`` in place.

    ``capturable=True``: graph-safe allocators (see the module's docstring), for the model, or with the
    global patch for every allocator made (at a model's first ``update_and_allocate``) while it is on.
    """
    if peft_model is not None:
        return _patch_model(peft_model, capturable)
    PeftModel, AdaLoraModel, _ = _peft()
    _OPTIONS["capturable"] = capturable
    if "AdaLoraModel.forward" in _ORIGINALS:
        return None  # already patched
    _ORIGINALS["AdaLoraModel.forward"] = AdaLoraModel.forward
    _ORIGINALS["AdaLoraModel.update_and_allocate"] = AdaLoraModel.update_and_allocate
    _ORIGINALS["AdaLoraModel._create_new_module"] = AdaLoraModel.__dict__["_create_new_module"]  # the staticmethod
    _ORIGINALS["PeftModel.forward"] = PeftModel.forward
    AdaLoraModel.forward = fast_forward
    AdaLoraModel.update_and_allocate = fast_update_and_allocate
    AdaLoraModel._create_new_module = staticmethod(_create_new_module)
    PeftModel.forward = _peft_model_forward
    _install_save_hook()
    return None


def _install_save_hook() -> None:
    """Saving reads ``peft_config.rank_pattern``: refresh it from a fast allocator first.

    Installed on the class (saving calls the tuner class's classmethod) and left in place by
    ``unpatch_peft`` while models converted in place may exist; for models without a fast allocator it
    does nothing.
    """
    _, AdaLoraModel, _ = _peft()
    if "AdaLoraModel._get_adapter_state_dict" not in _ORIGINALS:
        _ORIGINALS["AdaLoraModel._get_adapter_state_dict"] = AdaLoraModel.__dict__["_get_adapter_state_dict"]
        AdaLoraModel._get_adapter_state_dict = classmethod(_get_adapter_state_dict)


def unpatch_peft() -> None:
    """Restore PEFT's own classes (models converted in place keep their fast layers)."""
    _OPTIONS["capturable"] = False
    if "AdaLoraModel.forward" not in _ORIGINALS:
        return
    PeftModel, AdaLoraModel, _ = _peft()
    AdaLoraModel.forward = _ORIGINALS.pop("AdaLoraModel.forward")
    AdaLoraModel.update_and_allocate = _ORIGINALS.pop("AdaLoraModel.update_and_allocate")
    AdaLoraModel._create_new_module = _ORIGINALS.pop("AdaLoraModel._create_new_module")
    PeftModel.forward = _ORIGINALS.pop("PeftModel.forward")


def _patch_model(peft_model, capturable: bool):
    """Convert an existing PEFT AdaLoRA model in place: layers, allocator (with its scores and masks), penalty."""
    PeftModel, AdaLoraModel, _ = _peft()
    tuner = peft_model.base_model if isinstance(peft_model, PeftModel) else peft_model
    if not isinstance(tuner, AdaLoraModel):
        raise TypeError(f"patch_peft expects a PEFT AdaLoRA model, got {type(peft_model).__name__}")
    fast = fast_state(tuner, create=True)
    fast_alloc = fast.allocator
    if fast_alloc is not None and fast_alloc.capturable != capturable:
        raise ValueError(
            f"this model already has an adalora-fast allocator made with capturable={fast_alloc.capturable}; "
            "choose capturable at the model's first patch_peft (or, with the global patch, before its first "
            "update_and_allocate)"
        )
    fast.capturable = capturable
    for module in tuner.model.modules():
        _convert_layer(module)
    _install_save_hook()
    tuner.forward = types.MethodType(fast_forward, tuner)
    tuner.update_and_allocate = types.MethodType(fast_update_and_allocate, tuner)
    if isinstance(peft_model, PeftModel) and type(peft_model) is PeftModel:
        peft_model.forward = types.MethodType(_through_adalora_forward, peft_model)
    if hasattr(tuner, "trainable_adapter_name") and fast_alloc is None:  # (a fast allocator's state is newer)
        fast.import_pending = True  # PEFT's scores and masks, when the allocator is made
    return peft_model


@torch.no_grad()
def _import_peft_allocator_state(tuner, alloc: RankAllocator) -> None:
    """Carry PEFT's EMA dicts and rank_pattern into the flat state of the fast allocator."""
    peft_alloc = tuner.rankallocator
    alloc.state.load_named_emas(peft_alloc.exp_avg_ipt, peft_alloc.exp_avg_unc)
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern
    if pattern:  # (saved patterns may name lora_E without the adapter)
        adapter = tuner.trainable_adapter_name
        names = [t.name_E for t in alloc.triplets]
        alloc.state.load_keep({n: pattern.get(n, pattern.get(n.replace(f".{adapter}", ""))) for n in names})
