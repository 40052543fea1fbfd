"""Fixed-seed tiny random checkpoints for fast tests: Llama, Qwen2, Qwen3 and Mistral families.

Every build writes the same bytes on every run: a byte-level BPE tokenizer trained on the built-in corpus below
and a 2-layer model (hidden 128, 4 heads, 2 KV heads, head_dim 32) whose weights come from a seeded generator.
Weights are drawn wider than transformers' default init (std 0.02) so that greedy decoding is decisive: the gap
between the two largest logits stays well above float32 noise, so engines can be compared token for token.
`build_sentencepiece_tokenizer` builds a Llama-2-style tokenizer (byte fallback) for the detokenization tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
VOCAB_SIZE = 512
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<|endoftext|>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # special tokens come first in the vocabulary, in this order
# transformers 5 ignores tokenizer_config's class for model_type "qwen2" and rebuilds the pipeline as
# Qwen2Tokenizer (this split regex, NFC, and "<|endoftext|>" as unk, appended if absent). Training every family's
# tokenizer with the same pipeline and that token keeps tokenization and len(tokenizer) identical across families.
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SEED = 0  # family i uses SEED + i, so llama and mistral (same tensors when sliding_window is None) differ
MATRIX_STD = 0.2  # embeddings and projection weights (transformers' default is 0.02: near-flat logits)
FINAL_NORM_SCALE = 16.0  # logit std ~40: greedy top-2 gaps stay far above float32 noise (sample with T>1)
VECTOR_STD = 0.1  # norm weights are 1 + N(0, std²) and biases N(0, std²), so a skipped one changes the output

# ChatML-like, with <s>/</s> as the turn markers so that the end of an assistant turn is EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)

CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Berlin is the capital of Germany, and Rome is the capital of Italy.",
    "A serving engine schedules requests, batches tokens and manages a cache of keys and values.",
    "Prefill computes the prompt in one pass; decode produces one token at a time.",
    "The weather today is sunny with a light breeze from the west.",
    "She opened the window and listened to the rain falling on the roof.",
    "Numbers like 1, 2, 3, 42 and 1024 appear in many programs.",
    "Please write a short poem about the sea and the stars.",
    "Once upon a time there was a little robot who wanted to learn to paint.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "He bought apples, bananas, oranges and a loaf of fresh bread.",
    "Machine learning models learn patterns from large amounts of data.",
    "The train to London leaves from platform four every hour.",
    "Can you explain how a transformer attends to earlier tokens?",
    "Mountains, rivers and forests cover most of the northern region.",
    "My favourite colours are blue, green and a warm shade of yellow.",
    "The meeting was moved to Thursday afternoon because of the holiday.",
    "Cats sleep for most of the day and hunt in the evening.",
    "The old bridge was rebuilt in stone after the great flood.",
    "Good morning! How are you feeling today?",
    "I am fine, thank you. Let us begin the lesson.",
    "The server returned an error: the request timed out after thirty seconds.",
    "Every block in the cache holds sixteen tokens for each layer.",
    "Children were playing football in the park near the school.",
    "The recipe needs two eggs, a cup of flour and a pinch of salt.",
    "Light travels faster than sound, which is why we see lightning first.",
    "The museum has paintings, sculptures and ancient coins.",
    "Answer the question briefly and clearly, in one sentence.",
    "Tomorrow we will climb the hill and watch the sunrise.",
    "The program reads a file, counts the words and prints the result.",
    "Winter is cold and dark, but spring brings flowers and long days.",
    "A small boat sailed slowly across the quiet lake.",
    "The doctor said that rest and water would help him recover.",
    "They built a house with a red door and a garden full of roses.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "The history of science is full of surprising discoveries.",
    "Music, art and stories help people share their ideas.",
)


def build_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer (~512 tokens) on the built-in corpus, save it into ``path``, return it."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    wrapped.chat_template = CHAT_TEMPLATE
    assert (wrapped.pad_token_id, wrapped.bos_token_id, wrapped.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    path.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(path)
    return wrapped


# A Llama-2-style SentencePiece tokenizer (for detokenization tests; no model uses it): <unk>, <s>, </s>, then the
# 256 byte-fallback tokens <0x00>..<0xFF>, then BPE pieces that start a word with "▁". Characters outside
# SP_ALPHABET (newlines, ï, ü, 日本語, 🎉, ...) become byte tokens, as rare characters do in Llama-2.
SP_UNK, SP_BOS, SP_EOS = "<unk>", "<s>", "</s>"
SP_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
SP_CORPUS = (*CORPUS, "héllo wörld, café crème", "naïve 日本語 🎉", "Grüße aus Köln", "wörld héllo é ö")
SP_ALPHABET = sorted((set("".join(CORPUS)) - set(" \n")) | set("▁éö"))
SP_NUM_PIECES = 700  # trained pieces, special tokens and the alphabet included
SP_CHAT_TEMPLATE = (  # Llama-2's shape: the prompt ends with "[/INST]", the answer follows after a space
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def build_sentencepiece_tokenizer(path: Path, metaspace_decoder: bool = False) -> PreTrainedTokenizerFast:
    """Build the Llama-2-style tokenizer (Metaspace pre-tokenizer, BPE with byte fallback, BOS added), save it into
    ``path``, return it. Its decoder is Llama-2's (Replace "▁" → " ", ByteFallback, Fuse, Strip one leading space),
    or with ``metaspace_decoder`` the Metaspace decoder (the first token's "▁" dropped) after ByteFallback.
    Deterministic, in-process, no download."""
    tok = Tokenizer(models.BPE(unk_token=SP_UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=SP_NUM_PIECES,
        special_tokens=[SP_UNK, SP_BOS, SP_EOS],
        initial_alphabet=SP_ALPHABET,
        limit_alphabet=len(SP_ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator(SP_CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    pieces = sorted(data["model"]["vocab"].items(), key=lambda item: item[1])[3:]  # the specials keep ids 0, 1, 2
    names = [SP_UNK, SP_BOS, SP_EOS, *SP_BYTE_TOKENS, *(piece for piece, _ in pieces)]
    data["model"].update(vocab={name: i for i, name in enumerate(names)}, byte_fallback=True, fuse_unk=True)
    tok = Tokenizer.from_str(json.dumps(data))
    if metaspace_decoder:
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
        )
    else:
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    tok.post_processor = processors.TemplateProcessing(single=f"{SP_BOS} $A", special_tokens=[(SP_BOS, 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SP_BOS, eos_token=SP_EOS, unk_token=SP_UNK)
    wrapped.chat_template = SP_CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(path)
    return wrapped


def tiny_config(family: str, vocab_size: int) -> PretrainedConfig:
    """Return the tiny config of ``family`` (one of :data:`FAMILIES`) for a vocabulary of ``vocab_size``."""
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rms_norm_eps": 1e-6,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    if family == "llama":
        return LlamaConfig(**common, head_dim=32, tie_word_embeddings=False)
    if family == "qwen2":  # q/k/v projections carry a bias; head_dim is hidden_size / heads = 32
        return Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False, sliding_window=None)
    if family == "qwen3":  # per-head RMSNorm on q and k
        return Qwen3Config(
            **common, head_dim=32, tie_word_embeddings=False, use_sliding_window=False, sliding_window=None
        )
    if family == "mistral":
        return MistralConfig(**common, head_dim=32, tie_word_embeddings=False, sliding_window=None)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_tiny_model(path: Path, family: str) -> Path:
    """Build the fixed-seed tiny ``family`` checkpoint in ``path``: safetensors (float32), tokenizer, generation config.

    Deterministic: the same bytes on every run; the global torch RNG is left untouched. Returns ``path``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    tokenizer = build_tokenizer(path)
    config = tiny_config(family, len(tokenizer))
    config.architectures = [_ARCHITECTURES[family]]
    with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, torch.Generator().manual_seed(SEED + FAMILIES.index(family)))
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(path)
    return path


def build_tiny_variant(path: Path, family: str, seed: int, **overrides: Any) -> Path:
    """Like :func:`build_tiny_model`, with config fields overridden (e.g. ``attention_bias=True, mlp_bias=True``
    for a Llama whose every projection has a bias) and weights drawn from ``seed``. Deterministic; returns ``path``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    tokenizer = build_tokenizer(path)
    config = tiny_config(family, len(tokenizer))
    for key, value in overrides.items():
        setattr(config, key, value)
    config.architectures = [_ARCHITECTURES[family]]
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, torch.Generator().manual_seed(seed))  # biases get N(0, VECTOR_STD²) like Qwen2's
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(path)
    return path


def build_all(root: Path) -> dict[str, Path]:
    """Build every family of :data:`FAMILIES` into ``root/<family>``; return the directories by family."""
    return {family: build_tiny_model(root / family, family) for family in FAMILIES}


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


@torch.no_grad()
def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Redraw every parameter in name order from ``gen``, then scale the final norm by FINAL_NORM_SCALE.

    Matrices get N(0, MATRIX_STD²), norm weights 1 + N(0, VECTOR_STD²), biases N(0, VECTOR_STD²).
    """
    for name, param in sorted(model.named_parameters()):  # a tied lm_head is listed once, as embed_tokens
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if param.dim() >= 2:
            value = noise * MATRIX_STD
        elif name.endswith("bias"):
            value = noise * VECTOR_STD
        else:
            value = 1.0 + noise * VECTOR_STD
        if name == "model.norm.weight":
            value = value * FINAL_NORM_SCALE
        param.copy_(value)
