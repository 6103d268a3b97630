"""Vocabulary trimming: keep the N tokens a corpus uses (and the special tokens), rebuild the byte-level BPE
tokenizer and the embedding / LM head consistently.

Kept set: the special and added tokens, then corpus tokens by decreasing count until N, then closed under BPE
merges (every token a kept token is merged from), so the trimmed tokenizer keeps every merge that an encoding
made only of kept tokens applies: such a text encodes to the same tokens (renumbered). Ids keep their order.
"""

import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer


logger = logging.getLogger(__name__)


def merges_of(tokenizer_json: dict) -> list[tuple[str, str]]:
    """BPE merges as pairs (tokenizers writes either "a b" strings or [a, b] lists)."""
    return [
        tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)
        for merge in tokenizer_json["model"]["merges"]
    ]


def kept_token_ids(tokenizer, corpus: list[str], keep_vocab: int) -> list[int]:
    """Sorted ids of the kept tokens (module docstring); may exceed `keep_vocab` by the merge closure."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    kept = {token["id"] for token in state["added_tokens"]} | set(tokenizer.all_special_ids)
    counts = Counter(token for ids in tokenizer(corpus, add_special_tokens=False)["input_ids"] for token in ids)
    for token, _ in counts.most_common():
        if len(kept) >= keep_vocab:
            break
        kept.add(token)
    parts = {left + right: (left, right) for left, right in merges_of(state)}
    by_id = {index: token for token, index in vocab.items()}
    pending = [by_id[index] for index in kept if index in by_id]
    while pending:
        for part in parts.get(pending.pop(), ()):
            if vocab[part] not in kept:
                kept.add(vocab[part])
                pending.append(part)
    return sorted(kept)


def trim_tokenizer(tokenizer, keep_ids: list[int]):
    """A tokenizer with only `keep_ids` (renumbered 0.. in order), the merges among them, the same specials."""
    new_id = {old: new for new, old in enumerate(keep_ids)}
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = {token: new_id[index] for token, index in state["model"]["vocab"].items() if index in new_id}
    state["model"]["vocab"] = vocab
    state["model"]["merges"] = [
        [left, right] for left, right in merges_of(state) if left in vocab and right in vocab and left + right in vocab
    ]
    state["added_tokens"] = [{**token, "id": new_id[token["id"]]} for token in state["added_tokens"]]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        (Path(folder) / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False))
        return AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def trim_embedding(model, keep_ids: list[int]) -> None:
    """Keep rows `keep_ids` (renumbered 0..) of the embedding and LM head of `model` (a MicroVLMForCausalLM, in
    training form) in place, retying a tied head, and renumber the token ids its config and generation config hold.

    Raises:
        `ValueError`: if a token id the config names (image placeholder, bos/eos/pad) is not kept.
    """
    new_id = {old: new for new, old in enumerate(keep_ids)}
    index = torch.tensor(keep_ids)
    embedding = model.get_input_embeddings()
    tied = model.lm_head.weight is embedding.weight
    padding = new_id.get(embedding.padding_idx) if embedding.padding_idx is not None else None
    model.set_input_embeddings(nn.Embedding.from_pretrained(embedding.weight[index].clone(), False, padding))
    head = nn.Linear(model.lm_head.in_features, len(keep_ids), bias=False)
    head.weight = model.get_input_embeddings().weight if tied else nn.Parameter(model.lm_head.weight[index].clone())
    model.lm_head = head

    def renumber(owner, name: str) -> None:
        value = getattr(owner, name, None)
        if value is None:
            return
        if any(v not in new_id for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"trim_embedding: {name}={value} is not among the kept tokens; keep it")
        setattr(owner, name, [new_id[v] for v in value] if isinstance(value, list) else new_id[value])

    renumber(model.config, "image_token_id")
    for owner in (model.config, model.config.text_config, model.generation_config):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            renumber(owner, name)
    model.config.text_config.vocab_size = len(keep_ids)


def coverage(original, trimmed, texts: list[str]) -> dict[str, float]:
    """On held-out `texts`: the fraction encoded without unknown tokens (every character still reachable) and the
    fraction encoded to exactly the same tokens as before trimming (renumbered)."""
    kept = trimmed.get_vocab()
    same = without_unknown = 0
    for text in texts:
        before = original.convert_ids_to_tokens(original(text, add_special_tokens=False)["input_ids"])
        after = trimmed.convert_ids_to_tokens(trimmed(text, add_special_tokens=False)["input_ids"])
        without_unknown += "".join(after) == "".join(before) and all(token in kept for token in after)
        same += after == before
    return {"without_unknowns": without_unknown / max(len(texts), 1), "same_tokens": same / max(len(texts), 1)}
