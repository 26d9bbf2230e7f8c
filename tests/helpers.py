"""Shared builders for tests: a tokenizer trained locally and tiny models from a config."""

from __future__ import annotations

import random
from functools import lru_cache

import torch

WORDS = (
    "the a model learns forgets keeps text code fact answer question river mountain city "
    "red blue green one two three four five six seven eight nine ten cat dog bird fish "
    "runs jumps reads writes sings is was and or but not with from into over under"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "." for _ in range(n)]


@lru_cache(maxsize=1)
def make_tokenizer():
    """A byte-level BPE tokenizer trained on a small corpus, with BOS added to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() + [" ".join(WORDS)], trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


#: A chat template in the style of ChatML, with the tokenizer's own BOS/EOS as turn markers.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def make_chat_tokenizer():
    """A copy of :func:`make_tokenizer`'s tokenizer with :data:`CHAT_TEMPLATE` (the shared one stays
    without a template)."""
    import copy

    tok = copy.deepcopy(make_tokenizer())
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(seed: int = 0, vocab_size: int | None = None, kind: str = "llama"):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab_size = vocab_size or len(make_tokenizer())
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


TARGET_TEXT = "one two three four five six seven eight nine ten."


def pretrain(model, tokenizer, steps: int = 120, lr: float = 1e-2, seed: int = 0):
    """A few quick steps of language modelling on the general corpus, so there is something to forget."""
    torch.manual_seed(seed)
    texts = corpus(512, seed=seed + 100)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (32,), generator=g)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@lru_cache(maxsize=4)
def _pretrained_state(kind: str, seed: int):
    tok = make_tokenizer()
    model = pretrain(make_model(seed=seed, vocab_size=len(tok), kind=kind), tok, seed=seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def pretrained_model(kind: str = "llama", seed: int = 0):
    """A fresh copy of a (cached) briefly pretrained tiny model."""
    model = make_model(seed=seed, kind=kind)
    model.load_state_dict(_pretrained_state(kind, seed))
    return model


def target_dataset(tokenizer, n: int = 64):
    from datasets import Dataset

    return Dataset.from_list([{"text": TARGET_TEXT}] * n)


def sampled_activations(model, modules, sequences, keys):
    """Reference for activation capture: each sampled token's output of each module, from one
    unpadded forward of its sequence, in the order of ``keys`` (``(probe, example, choice, t)``).

    ``modules``: ``{name: module}``; ``sequences``: the probe's tokenised sequences.
    Returns ``{name: tensor(len(keys) × width)}``.
    """
    outs = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o)) for n, m in modules.items()]
    seqs = {(s.example, s.choice): s for s in sequences}
    want = {n: [] for n in modules}
    try:
        with torch.no_grad():
            for _, ex, ch, t in keys:
                model(input_ids=torch.tensor([seqs[(ex, ch)].ids]))
                for n in modules:
                    want[n].append(outs[n][0, t])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.stack(v) for n, v in want.items()}


def loop_config(every: int, max_rise: float, action: str = "stop", **rewind) -> dict:
    """A small monitor config for the adapter tests: probes every ``every`` steps, no TensorBoard,
    one budget on ``delta_nll/general`` (``rewind``: the rewind section, for ``action="rewind"``)."""
    cfg = {
        "cadence": {"every_n_steps": every},
        "probe": {"batch_size": 8, "max_length": 64},
        "logging": {"tensorboard": False},
        "budgets": [{"key": "delta_nll/general", "max_rise": max_rise, "action": action}],
    }
    if rewind:
        cfg["rewind"] = rewind
    return cfg
