"""sd-scripts' ``--max_token_length 150|225`` and ``--clip_skip`` for CLIP text encoders (SDXL).

A caption is tokenized to ``max_token_length + 2`` tokens and cut into 75-token chunks, each encoded as its own
77-token sequence ``<BOS> 75 tokens <EOS/PAD>``; the encoder states of the chunks are joined back to one sequence
(the first chunk's BOS, every chunk's 75 middle states, the last chunk's final state), and the pooled output is the
first chunk's, exactly as sd-scripts' SDXL text encoding does.
"""

from __future__ import annotations

import torch

MAX_TOKEN_LENGTHS = (75, 150, 225)


def chunked_token_ids(tokenizer, captions: list[str], max_token_length: int | None) -> torch.Tensor:
    """Token ids (batch, chunks, model_max_length): one chunk of 77 without ``max_token_length`` (or 75), else
    ``max_token_length / 75`` chunks built as sd-scripts builds them (SDXL's second tokenizer, whose pad is not EOS,
    gets EOS after a chunk's last real token and after a BOS followed by padding)."""
    length = tokenizer.model_max_length
    if not max_token_length or max_token_length + 2 <= length:
        ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return ids.input_ids[:, None]
    total = max_token_length + 2
    ids = tokenizer(captions, padding="max_length", max_length=total, truncation=True, return_tensors="pt").input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, total - length + 2, length - 2):
        chunk = torch.cat([ids[:, :1], ids[:, start : start + length - 2], ids[:, -1:]], dim=1)
        if pad != eos:
            ends_with_token = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[ends_with_token, -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def join_chunk_states(states: torch.Tensor, chunks: int) -> torch.Tensor:
    """(batch·chunks, 77, d) encoder states -> (batch, 2 + 75·chunks, d): first BOS, the chunks' middles, last end."""
    batch = states.shape[0] // chunks
    length = states.shape[1]
    states = states.reshape(batch, chunks * length, states.shape[-1])
    if chunks == 1:
        return states
    middles = [states[:, i * length + 1 : (i + 1) * length - 1] for i in range(chunks)]
    return torch.cat([states[:, :1], *middles, states[:, -1:]], dim=1)
