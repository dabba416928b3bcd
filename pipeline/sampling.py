"""Sampling for ``generate`` without ``torch.multinomial``.

On the CPU, ``torch.multinomial`` draws one exponential random number per vocabulary entry and
row at every step, a large share of each decoding step over a 49k-token vocabulary. Inverse-CDF
sampling needs one uniform number per row: a cumulative sum and a binary search. The draw comes
from the same distribution (softmax of the temperature-scaled, top-k/top-p-filtered logits); only
the random stream differs.

``generate`` has no hook for the sampling step itself, so the draw is a logits processor, run
after HF's own temperature / top-k / top-p warpers, that leaves the sampled token the only one
with a finite score; ``generate`` then runs in greedy mode and takes it. The speed-up is measured
by ``benchmarks/bench_ppo_generation.py`` (figures in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


def inverse_cdf_sample(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` ``[B, V]`` (non-negative, rows need not sum to exactly 1) -> ``[B]``."""
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    # u * total can round up to the total; the clamp may then land on a zero-probability tail token.
    bad = probs.gather(1, idx) <= 0
    if bad.any():
        idx = torch.where(bad, probs.argmax(-1, keepdim=True), idx)
    return idx.squeeze(1)


class InverseCDFSampler(LogitsProcessor):
    """Draws the next token from ``softmax(scores)`` and returns scores with only that token finite.

    With ``record_logprobs=True`` it also keeps, step by step, the log-probability of each drawn token
    under the distribution it was drawn from (after temperature, top-k and top-p): ``take_logprobs()``
    returns them as ``[B, steps]``, aligned with the generated tokens. That is the sampling policy's own
    log-prob of its sample at no extra forward pass (the evaluation's Monte-Carlo KL uses it). Under
    ``model.generate`` rows that already finished keep drawing; under ``pipeline.decoding.generate`` they
    leave the batch and record 0 (``set_rows``). Either way, mask them with the response mask.

    With ``record_entropy=True`` it keeps the entropy of each step's distribution the same way
    (``take_entropy()``), the policy entropy PPO logs, without a forward over the responses.
    """

    def __init__(self, record_logprobs: bool = False, record_entropy: bool = False):
        self.record_logprobs, self.record_entropy = record_logprobs, record_entropy
        self._logprobs: list[torch.Tensor] = []
        self._entropy: list[torch.Tensor] = []
        self._rows: tuple[torch.Tensor, int] | None = None
        self.drawn: torch.Tensor | None = None  # the last call's tokens [B]

    def set_rows(self, rows: torch.Tensor, batch_size: int) -> None:
        """The next call's scores are those of rows ``rows`` of a batch of ``batch_size`` (a decoding loop that
        drops finished rows, ``pipeline/decoding.py``, says so before each step); the others record 0."""
        self._rows = (rows, batch_size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        tokens = inverse_cdf_sample(probs)
        self.drawn = tokens  # the argmax of the scores returned: ``pipeline.decoding.generate`` reads it instead
        rows, self._rows = self._rows, None
        if self.record_logprobs or self.record_entropy:
            logp_all = torch.log_softmax(scores.float(), dim=-1)
            if self.record_logprobs:
                self._logprobs.append(self._all_rows(logp_all.gather(1, tokens.unsqueeze(1)).squeeze(1), rows))
            if self.record_entropy:  # p == 0 where logp == -inf (filtered tokens): they add 0, not NaN
                entropy = -(probs * torch.where(probs > 0, logp_all, 0.0)).sum(-1)
                self._entropy.append(self._all_rows(entropy, rows))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens.unsqueeze(1), 0.0)

    @staticmethod
    def _all_rows(values: torch.Tensor, rows: tuple[torch.Tensor, int] | None) -> torch.Tensor:
        """One value per row of the whole batch: 0 for rows that left it (``set_rows``)."""
        return values if rows is None else values.new_zeros(rows[1]).index_copy_(0, rows[0], values)

    def take_logprobs(self) -> torch.Tensor:
        """The recorded log-probs since the last call, ``[B, steps]``; clears the record."""
        if not self._logprobs:
            raise RuntimeError(
                "no log-probs recorded: create the sampler with record_logprobs=True and generate first"
            )
        out, self._logprobs = torch.stack(self._logprobs, 1), []
        return out

    def take_entropy(self) -> torch.Tensor:
        """The recorded entropies since the last call, ``[B, steps]`` (nats); clears the record."""
        if not self._entropy:
            raise RuntimeError("no entropy recorded: create the sampler with record_entropy=True and generate first")
        out, self._entropy = torch.stack(self._entropy, 1), []
        return out


# Greedy decoding, whatever sampling defaults the model's generation config carries.
GREEDY = dict(do_sample=False, temperature=None, top_k=None, top_p=None)


def sampling_kwargs(
    temperature: float, top_k: int = 0, top_p: float = 1.0, sampler: InverseCDFSampler | None = None
) -> dict:
    """``generate`` keyword arguments that sample at ``temperature`` (with optional top-k / top-p) through
    ``InverseCDFSampler``: HF's own warpers, then the draw, then greedy selection of the drawn token.
    Pass your own ``sampler`` (e.g. one that records log-probs) to keep a handle on it."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k and top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return dict(**GREEDY, logits_processor=LogitsProcessorList([*warpers, sampler or InverseCDFSampler()]))
