"""Activation checkpointing whose saved layer inputs wait in CPU memory (issue #14).

With activation checkpointing a decoder layer keeps only its input for the backward
(batch × seq × hidden, bf16: 64 MiB per layer for an 8B Llama at 4 × 2048 tokens, 2 GiB
over 32 layers) and recomputes the rest. Here that input is copied to pinned CPU memory
on a side stream while the layer runs, and copied back — one layer ahead, again on the
side stream — while the backward of the layer after it runs, so the copies overlap
compute and the GPU holds at most two layer inputs at a time.

Why our own: torch's `torch.autograd.graph.save_on_cpu` copies every saved tensor
synchronously (the GPU waits for each copy), and torch.utils.checkpoint keeps the layer
inputs on the GPU; no maintained library in loraflow's dependencies overlaps the two.
The recomputation follows torch.utils.checkpoint's reentrant variant (the RNG state of
the forward is restored, so LoRA dropout draws the same mask).

Imports torch lazily, like the rest of tasks.training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

_STREAMS: dict = {}  # device → the side stream the copies run on


def _side_stream(device):
    import torch

    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


@dataclass(eq=False)
class _SavedInput:
    """One layer's input while it waits for the backward: in CPU memory (`host`), then —
    once the backward of the next layer starts — back on the GPU (`device_copy`, ready
    when `ready` has passed on the side stream)."""

    index: int
    device: Any
    host: Any = None
    copied: Any = None  # event: the device → host copy is done
    device_copy: Any = None
    ready: Any = None  # event: the host → device copy is done
    previous: Optional["_SavedInput"] = field(default=None, repr=False)

    def prefetch(self) -> None:
        """Start the copy back to the GPU on the side stream (once)."""
        import torch

        if self.device_copy is not None or self.host is None:
            return
        if self.device.type != "cuda":
            self.device_copy, self.host = self.host.to(self.device), None
            return
        current = torch.cuda.current_stream(self.device)
        side = _side_stream(self.device)
        # Allocated on the compute stream, which uses it; filled on the side stream.
        self.device_copy = torch.empty_like(self.host, device=self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            side.wait_event(self.copied)
            self.device_copy.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(side)
        self.host = None  # the side stream holds the pinned block until the copy ran

    def take(self):
        """The input back on the GPU, waited for on the compute stream."""
        import torch

        self.prefetch()
        tensor, self.device_copy = self.device_copy, None
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        return tensor


_LAST: Optional[_SavedInput] = None  # the newest saved input of the running forward pass


def _offload(tensor, index: int) -> _SavedInput:
    import torch

    global _LAST
    previous = _LAST if _LAST is not None and _LAST.index == index - 1 else None
    saved = _SavedInput(index=index, device=tensor.device, previous=previous)
    if tensor.device.type == "cuda":
        current = torch.cuda.current_stream(tensor.device)
        side = _side_stream(tensor.device)
        saved.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            saved.host.copy_(tensor, non_blocking=True)
            saved.copied = torch.cuda.Event()
            saved.copied.record(side)
        tensor.record_stream(side)  # its block is not reused before the copy ran
    else:  # CPU training (tests): the "offload" is a copy, the bookkeeping is the same
        saved.host = tensor.detach().clone()
    _LAST = saved
    return saved


def _run_offloaded():
    import torch
    from torch.utils.checkpoint import get_device_states, set_device_states

    class OffloadedCheckpoint(torch.autograd.Function):
        """forward(run, index, hidden_states, forced) → run(hidden_states) without saving
        activations; `forced` is an empty tensor that requires grad, so the output does
        too when the input (the embeddings' output of a frozen base) does not."""

        @staticmethod
        def forward(ctx, run, index, hidden_states, forced):
            ctx.run = run
            ctx.input_requires_grad = hidden_states.requires_grad
            ctx.autocast = _autocast_state(hidden_states.device.type)
            ctx.cpu_rng = torch.get_rng_state()
            ctx.devices, ctx.device_rng = get_device_states(hidden_states)
            ctx.saved = _offload(hidden_states, index)
            with torch.no_grad():
                return run(hidden_states)

        @staticmethod
        def backward(ctx, *grads):
            saved = ctx.saved
            hidden_states = saved.take().detach()
            if saved.previous is not None:  # the layer before runs its backward next
                saved.previous.prefetch()
            hidden_states.requires_grad_(ctx.input_requires_grad)
            # The forward's RNG (dropout masks) and autocast (the Trainer's bf16): the
            # backward runs outside both.
            with torch.random.fork_rng(devices=ctx.devices, enabled=True):
                torch.set_rng_state(ctx.cpu_rng)
                set_device_states(ctx.devices, ctx.device_rng)
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    outputs = ctx.run(hidden_states)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            pairs = [(o, g) for o, g in zip(outputs, grads)
                     if torch.is_tensor(o) and o.requires_grad and g is not None]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            grad_input = hidden_states.grad if ctx.input_requires_grad else None
            return None, None, grad_input, None

    return OffloadedCheckpoint


_FUNCTION = None


def _autocast_state(device_type: str) -> dict:
    """torch.autocast's arguments that re-enter the autocast state in force now."""
    import torch

    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type),
            "cache_enabled": torch.is_autocast_cache_enabled()}


def offloaded_checkpoint(index: int):
    """A checkpoint function for transformers' GradientCheckpointingLayer
    (`layer._gradient_checkpointing_func(partial(layer.__call__, **kwargs), *args)`) of
    decoder layer `index`: checkpointing as torch.utils.checkpoint does, with the layer's
    input in pinned CPU memory until its backward.

    Layer inputs other than the hidden states (rotary embeddings, masks) are kept as
    they are: they are shared by every layer. Falls back to torch.utils.checkpoint
    (non-reentrant) when another input needs a gradient (the offloaded path returns one
    for the hidden states only), and inside a region torch.compile traces: transformers
    from 5.2x checkpoints within the layer's forward, so with compiled layers the call
    comes from compiled code, where the copies and the RNG bookkeeping cannot be traced
    and a recomputation outside it would draw other dropout masks. The function's
    `offloaded` attribute says whether the offloaded path ran.
    """
    import torch

    def checkpoint(run, hidden_states, *args):
        global _FUNCTION
        if _FUNCTION is None:
            _FUNCTION = _run_offloaded()
        others = [a for a in args if torch.is_tensor(a)]
        keywords = getattr(run, "keywords", {}) or {}
        others += [v for v in keywords.values() if torch.is_tensor(v)]
        others += [t for v in keywords.values() if isinstance(v, tuple)
                   for t in v if torch.is_tensor(t)]
        if torch.compiler.is_compiling() or any(t.requires_grad for t in others) \
                or not torch.is_tensor(hidden_states):
            return torch.utils.checkpoint.checkpoint(run, hidden_states, *args,
                                                     use_reentrant=False)
        forced = torch.empty(0, device=hidden_states.device, requires_grad=True)

        def call(x):
            return run(x, *args)

        checkpoint.offloaded = True
        return _FUNCTION.apply(call, index, hidden_states, forced)

    checkpoint.offloaded = False
    return checkpoint


def offloading_layers(model) -> int:
    """How many decoder layers of `model` ran their checkpointing through
    offloaded_checkpoint's offloaded path."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
               and m.gradient_checkpointing
               and getattr(getattr(m, "_gradient_checkpointing_func", None), "offloaded",
                           False))


def offload_checkpointed_layers(model) -> int:
    """Give every decoder layer that checkpoints (Trainer turned it on; partial
    checkpointing may have turned some off) the offloaded checkpoint function.
    Returns how many layers offload."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = 0
    for index, layer in enumerate(layers):
        if layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = offloaded_checkpoint(index)
            count += 1
    return count


def offload_callback():
    """A TrainerCallback applying offload_checkpointed_layers once Trainer has enabled
    checkpointing (at the start of train), after partial checkpointing's callback."""
    from transformers import TrainerCallback

    class OffloadActivations(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            offload_checkpointed_layers(model)

    return OffloadActivations()
