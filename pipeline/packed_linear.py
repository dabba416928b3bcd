"""bf16 linear layers with their weights prepacked for oneDNN, on the CPU.

A bf16 ``F.linear`` on a CPU goes to oneDNN's matmul primitive, which takes the plain ``[N, K]`` weight at
every call and brings it into the blocked layout its kernel reads as it goes. For a matrix product with few
rows (a decoding step: batch x 1 token) that handling of the weight is a large part of the call, and the product runs
well below the memory bandwidth. Packing each frozen weight once into oneDNN's blocked layout and calling its
inner-product primitive on the packed copy (``torch.ops.mkldnn._reorder_linear_weight`` /
``_linear_pointwise``, what inductor's CPU weight freezing emits) skips that work. On the 2-core AVX512-BF16
host (``benchmarks/bench_kernels.py linear``, docs/benchmarks.md, 2026-12-05): 8 rows x SmolLM2's 1536 x 576
projection 144 -> 81 us with the weight coming from memory, its 49,152-token vocabulary projection
4.2 -> 1.8 ms. The outputs are the same bits as ``F.linear``'s: both primitives pick the same brgemm kernels
on the host measured. That is observed, not guaranteed across oneDNN versions and ISAs, so ``supported()``
checks it once per process on a few shapes and packing stays off where it fails; tests/test_packed_linear.py
checks it more widely on the host that runs the tests. So nothing sampled, scored or learned changes.

``pack_linears(model)`` turns every ``nn.Linear`` of ``model`` whose weight is a frozen CPU tensor into a
:class:`PackedLinear` (a subclass: PEFT still wraps it, state dicts and ``deepcopy`` are unchanged). A call
takes the packed path when it computes in bf16: a bf16 weight with a bf16 input or under CPU autocast to bf16,
or a float32 weight under that autocast (the packed copy is then made from the weight cast to bf16, the cast
autocast makes at every call). Anything else runs ``nn.Linear.forward``. An input that requires grad goes
through an autograd function whose backward is ``F.linear``'s input gradient, ``grad @ W`` with the bf16 ``W``,
computed as a packed product on ``W^T`` packed at the layer's first backward where that gives the same bits
(``transposed_supported``, checked once per process): 2-4% faster per product for the LoRA update's 560-2,000
rows, 16% for the vocabulary projection (``benchmarks/bench_kernels.py backward-products``; over a whole PPO
update, within run-to-run noise, docs/benchmarks.md 2026-12-05 night); the weight itself never trains here.
The packed copy is rebuilt when the weight changes in place
through autograd-visible ops (``copy_`` under ``no_grad``, as ``MergedPolicy.sync`` does), is replaced, or the
module moves or changes dtype. A write through ``weight.data`` is invisible to the version counter, and PEFT's
LoRA ``merge``/``unmerge`` (``merge_adapter``, ``merge_and_unload``) write that way: code that merges adapters
into packed base layers calls ``repack(model)`` after (the pipeline merges only into freshly loaded models).
The packed copies cost memory: one more bf16 copy of each packed weight (270 MB for
SmolLM2-135M), two for a float32 weight (the packed and the plain bf16 one), and one more for each layer that
backpropagates (its packed ``W^T``).

Off where it would not be the same bits or not faster: without oneDNN bf16 support in this torch build or CPU
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``) or where the check above fails, with oneDNN disabled
(``torch.backends.mkldnn.flags(enabled=False)``, when ``F.linear`` takes another kernel), on accelerators,
for products computed in float32
(oneDNN's packed float32 product rounds differently from MKL's, which ``F.linear`` uses), and for
non-contiguous inputs.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def supported() -> bool:
    """Whether packed products give ``F.linear``'s bits here: this torch build and CPU run oneDNN's bf16
    kernels, and a packed product equals ``F.linear``'s on a few of the shapes the pipeline runs (rows 1, 8
    and 300; a bias or none). ``F.linear`` reaches oneDNN through its matmul primitive and the packed product
    through its inner-product primitive; they pick the same kernels on the hosts measured, which this checks
    once per process rather than assumes (another oneDNN version or ISA might not)."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        gen = torch.Generator().manual_seed(0)
        for rows, n_in, n_out, bias in ((1, 96, 160, False), (8, 576, 192, True), (300, 160, 96, False)):
            w = torch.randn(n_out, n_in, generator=gen).to(torch.bfloat16)
            b = torch.randn(n_out, generator=gen).to(torch.bfloat16) if bias else None
            x = torch.randn(rows, n_in, generator=gen).to(torch.bfloat16)
            if not torch.equal(_packed_product(x, _pack(w), b), torch.nn.functional.linear(x, w, b)):
                return False  # (also where oneDNN is disabled at the first check: F.linear then takes another kernel)
        return True
    except (AttributeError, RuntimeError):
        return False


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # The batch-size hint picks oneDNN's blocking: 8 rows, a decoding step's (``supported`` checks other sizes).
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def transposed_supported() -> bool:
    """Whether an input gradient ``grad @ W`` (``F.linear``'s backward, a oneDNN matmul on the plain ``W``) equals
    the packed product of ``grad`` with ``W^T`` packed once, on a few of the shapes a LoRA update runs: checked
    once per process, as ``supported`` checks the forward."""
    if not supported():
        return False
    try:
        gen = torch.Generator().manual_seed(1)
        for rows, n_out, n_in in ((1, 160, 96), (8, 192, 576), (300, 96, 160), (601, 576, 192)):
            w = torch.randn(n_out, n_in, generator=gen).to(torch.bfloat16)
            g = torch.randn(rows, n_out, generator=gen).to(torch.bfloat16)
            if not torch.equal(_packed_product(g, _pack(w.t().contiguous()), None), g @ w):
                return False
        return True
    except (AttributeError, RuntimeError):
        return False


class _PackedLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` on the packed weight; the input gradient is ``grad @ W`` as for ``F.linear``, on ``W^T``
    packed at the first backward (``PackedLinear.packed_transposed``) where that gives the same bits."""

    @staticmethod
    def forward(ctx, x, packed, weight, bias, module):
        ctx.module = module
        ctx.save_for_backward(weight)
        return _packed_product(x, packed, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if grad.dtype == torch.bfloat16 and grad.is_contiguous() and transposed_supported():
            return _packed_product(grad, ctx.module.packed_transposed(weight), None), None, None, None, None
        return grad @ weight, None, None, None, None


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose bf16 calls run on a prepacked copy of its frozen weight (module docstring)."""

    _packed: torch.Tensor | None = None  # the oneDNN-packed bf16 weight
    _bf16: torch.Tensor | None = None  # the bf16 weight the packed copy was made from (the backward's ``W``)
    _source: torch.Tensor | None = None  # the weight it was made from, held so that its address is not reused
    _packed_key: tuple | None = None
    _packed_t: tuple | None = None  # (the bf16 weight, its key, its transpose packed), for the backward

    def __getstate__(self):
        # The packed copy is an opaque oneDNN tensor that cannot be copied or pickled: copies repack.
        return {**super().__getstate__(), "_packed": None, "_bf16": None, "_source": None, "_packed_key": None,
                "_packed_t": None}  # fmt: skip

    def _apply(self, fn, recurse=True):
        self.drop_packed()  # a move or cast makes new weights: repack at the next call
        return super()._apply(fn, recurse)

    def drop_packed(self) -> None:
        self._packed = self._bf16 = self._source = self._packed_key = self._packed_t = None

    def packed_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed, bf16 weight)``, rebuilt when the weight changed since they were made."""
        w = self.weight
        key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype)
        if self._packed is None or self._packed_key != key:
            bf16 = w.detach().to(torch.bfloat16)  # autocast's cast of a float32 weight; the weight itself if bf16
            self._packed, self._bf16, self._source, self._packed_key = _pack(bf16), bf16, w.detach(), key
        return self._packed, self._bf16

    def packed_transposed(self, bf16: torch.Tensor) -> torch.Tensor:
        """``bf16^T`` packed, for the input gradient of a forward that ran on ``bf16`` (the weight's bf16 copy it
        saved): made at the first backward through this layer, so only layers that backpropagate hold one; made
        again when the weight, and so its bf16 copy, changed."""
        key = (bf16.data_ptr(), bf16._version, tuple(bf16.shape))
        if self._packed_t is None or self._packed_t[1] != key:
            # (holding bf16, so that its address is not reused by another tensor while the key stands)
            self._packed_t = (bf16, key, _pack(bf16.t().contiguous()))
        return self._packed_t[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        grad = torch.is_grad_enabled()
        autocast = torch.is_autocast_enabled("cpu")
        compute = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        if (
            compute != torch.bfloat16
            or not (w.dtype == torch.bfloat16 or (autocast and w.dtype == torch.float32))
            or w.device.type != "cpu"
            or (grad and (w.requires_grad or (b is not None and b.requires_grad)))
            or not x.is_contiguous()
            or not torch.backends.mkldnn.enabled  # F.linear then takes another kernel, with other bits
        ):
            return super().forward(x)
        x = x.to(torch.bfloat16)
        bias = None if b is None else b.to(torch.bfloat16)
        packed, bf16 = self.packed_weight()
        if grad and x.requires_grad:
            return _PackedLinearFunction.apply(x, packed, bf16, bias, self)
        return _packed_product(x, packed, bias)


def pack_linears(model: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` of ``model`` with a frozen CPU weight in bf16 or float32 a
    :class:`PackedLinear`; returns ``model``. A no-op where oneDNN's bf16 linear is not available
    (``supported``). Weights are packed at their first bf16 call, so packing a model that later moves to an
    accelerator or never computes in bf16 costs nothing."""
    if not supported():
        return model
    for mod in model.modules():
        if (
            type(mod) is nn.Linear
            and mod.weight.dtype in (torch.bfloat16, torch.float32)
            and mod.weight.device.type == "cpu"
            and not mod.weight.requires_grad
        ):
            mod.__class__ = PackedLinear
            mod.drop_packed()
    return model


def repack(model: nn.Module) -> None:
    """Drop the packed copies of ``model``'s weights (after writing them through ``.data``); the next call repacks."""
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            mod.drop_packed()
