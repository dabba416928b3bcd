"""Model and tokenizer helpers shared by every stage."""

from __future__ import annotations

PAD_TOKEN = "<|pad|>"


def ensure_distinct_pad_token(tokenizer, model=None) -> None:
    """Give ``tokenizer`` a pad token different from EOS, and tell ``model`` about it.

    Many chat models ship with pad == eos (SmolLM2 does); then padding masks would hide real
    EOS tokens and a padded batch could not tell where a response ends. We reuse an existing
    special token that is neither EOS nor BOS (the ``unk`` token, e.g. SmolLM2's
    ``<|endoftext|>``) when there is one, else add ``<|pad|>`` and resize the embeddings.
    The SFT stage saves the tokenizer, so every later stage inherits the choice.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        pass
    elif tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in (eos, tokenizer.bos_token_id):
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
