"""The rollout's scoring forwards (``PPOTrainer._scored``, through ``decoding.scoring_forward``) against one
padded forward per chunk, as the rollout computed them before."""

from __future__ import annotations

import torch

from pipeline import decoding
from pipeline.ppo.core import logprobs_from_logits
from pipeline.sequences import response_logits, response_logprobs
from tests.conftest import make_trainer


def test_rollout_scoring_equals_one_padded_forward(tiny_artifacts, prompts_file):
    trainer, _, batch = make_trainer(
        tiny_artifacts, prompts_file, rollout_batch_size=8, local_rollout_forward_batch_size=8, response_length=8
    )
    net = trainer.unwrapped
    with torch.no_grad():
        qr, am, P, _, _, _ = trainer._generate(batch)
        R = qr.shape[1] - P
        # Responses that end early, as EOS would end them (the tiny model rarely draws it): chunks are cut.
        mask = torch.arange(R).unsqueeze(0) < torch.tensor([8, 1, 3, 5, 2, 8, 6, 4]).unsqueeze(1)
        qr = torch.cat([qr[:, :P], qr[:, P:].masked_fill(~mask, trainer.tokenizer.pad_token_id)], 1)
        am = torch.cat([am[:, :P], mask.long()], 1)
        resp = qr[:, P:]
        assert decoding._shared_prefix_length(qr[:, :P], am[:, :P].sum(1)) > 0  # the chat template's start
        with torch.no_grad():  # a trained-looking adapter, so that policy and reference differ
            for name, p in net.policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        got = logprobs_from_logits(response_logits(trainer._scored(qr, am, P, "policy"), R, 0.7), resp)
        want = response_logprobs(net.policy, qr, am, resp, 0.7)
        torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
        with net.policy.disable_adapter():
            ref = logprobs_from_logits(response_logits(trainer._scored(qr, am, P, "policy"), R, 0.7), resp)
            ref_want = response_logprobs(net.policy, qr, am, resp, 0.7)
        torch.testing.assert_close(ref[mask], ref_want[mask], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ref[mask], got[mask])
        values = trainer._scored(qr, am, P, "value")[:, :-1]
        values_want = net.values(qr, am)[:, P - 1 : -1]
        torch.testing.assert_close(values[mask], values_want[mask], atol=1e-5, rtol=1e-5)
