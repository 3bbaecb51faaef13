"""Tiny, random-initialised Qwen-family model folders for offline tests and CPU smoke runs.

No model can be downloaded in CI or on the air-gapped training hosts, yet ms-swift, transformers and the
pipelines need a *real* model folder (config, safetensors, tokenizer, generation config, processor). This
module builds one locally in a second or two: a byte-level BPE tokenizer trained on whatever text is at
hand (e.g. the TeleAntiFraud transcripts), Qwen's special tokens and chat template, and a 2-layer model
with random weights. The folder loads with the transformers Auto classes and with ms-swift via
``TinyModel.swift_args()``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER_FILE = "teleguard_tiny_model.json"

ARCHS = ("qwen2", "qwen3", "qwen2_audio")

# ms-swift's (model_type, template) names for each architecture; a local folder has no hub id from which
# ms-swift could infer them, so they must be passed explicitly.
_SWIFT_NAMES: dict[str, tuple[str, str]] = {
    "qwen2": ("qwen2", "qwen2_5"),
    "qwen3": ("qwen3", "qwen3"),
    "qwen2_audio": ("qwen2_audio", "qwen2_audio"),
}

# Attention heads are this wide unless told otherwise: the size the CPU recipes and the main job train (and their
# published figures) were measured with. vLLM's CPU attention refuses head_dim 16 ("Unsupported CPU attention
# configuration: head_dim=16"); a model for vLLM is built with VLLM_TINY_SIZE (head_dim 64).
DEFAULT_HEAD_DIM = 16
# The smallest tiny size vLLM's CPU build runs: hidden 128 in 2 heads of 64.
VLLM_TINY_SIZE: dict[str, int] = {"hidden_size": 128, "head_dim": 64}

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_EOS = "<|audio_eos|>"

# Same pre-tokenisation as the real Qwen2 tokenizer, so token boundaries behave like production.
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# Always part of the training text so that the reasoning/answer tags, JSON punctuation and common
# Chinese get merged tokens even when the caller passes an empty corpus.
_BUILTIN_TEXT: tuple[str, ...] = (
    "<think>\n",
    "</think>\n",
    "<answer>",
    "</answer>",
    "<think>\n\n</think>\n\n",
    '{"label": "fraud", "fraud_type": "客服诈骗", "confidence": 0.9, "reason": ""}',
    '{"is_fraud": true}',
    '{"is_fraud": false}',
    "[]",
    "{}",
    '": "',
    '", "',
    '": [',
    "], ",
    "null",
    "0123456789",
    "true false yes no fraud normal scam",
    "You are a helpful assistant.",
    "user",
    "assistant",
    "system",
    "您好，这里是银行客服中心，您的账户出现异常，请提供验证码。",
    "这是一通正常的电话，不是诈骗。这是诈骗电话，请立即挂断。",
    "诈骗 正常 可疑 转账 验证码 银行卡 快递 投资 客服 警方 退款 贷款 中奖",
    "用户 通话 对话 分析 判断 结论 理由 阶段 风险 类型",
)

_BUILTIN_REPEAT = 64

# Qwen2.5-style ChatML template. Content may be a string or a list of {"type": "text"/"audio"} parts, the
# latter rendered like Qwen2-Audio's processor does. `enable_thinking=False` mirrors Qwen3's empty think block.
CHAT_TEMPLATE = (
    "{%- set audio_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part -%}"
    "{%- set audio_count.value = audio_count.value + 1 -%}"
    "{{- 'Audio ' + audio_count.value|string + ': <|audio_bos|><|AUDIO|><|audio_eos|>\\n' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class TinyModel:
    """A built tiny model folder plus the ms-swift names needed to load it."""

    path: Path
    arch: str
    model_type: str
    template: str

    def swift_args(self) -> list[str]:
        return ["--model", str(self.path), "--model_type", self.model_type, "--template", self.template]


def corpus_from_paths(paths: Iterable[Path]) -> Iterator[str]:
    """Yield text from .txt files (one item per non-empty line) and .jsonl files (every string value,
    found recursively, so nested transcripts such as TeleAntiFraud's ``left``/``right`` lists count)."""
    for path in paths:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".txt", ".jsonl"):
            continue
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                if suffix == ".txt":
                    yield line
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a truncated last line should not abort a corpus scan
                yield from _strings(record)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _special_tokens(arch: str) -> list[str]:
    tokens = [ENDOFTEXT, IM_START, IM_END]
    if arch == "qwen2_audio":
        tokens += [AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS]
    return tokens


def _build_tokenizer(arch: str, corpus: Iterable[str], vocab_size: int) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    specials = _special_tokens(arch)
    # Leave room for the special tokens, which go right after the BPE vocabulary (as in Qwen's vocab).
    bpe_size = vocab_size - len(specials)
    if bpe_size < 256 + 16:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 272 + specials"
        )

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=2,
        show_progress=False,
        # All 256 byte symbols, so any text (including unseen Chinese) encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def texts() -> Iterator[str]:
        # Repeated so the tags win merges against a large corpus that never contains them.
        for _ in range(_BUILTIN_REPEAT):
            yield from _BUILTIN_TEXT
        yield from corpus

    bpe.train_from_iterator(texts(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    vocab: dict[str, int] = dict(state["vocab"])
    # Put the special tokens right after the BPE vocabulary in Qwen's order (<|endoftext|> first), so ids
    # do not depend on which of them the tokenizer constructor happens to register first.
    for token in specials:
        vocab.setdefault(token, len(vocab))

    extra = {}
    if arch == "qwen2_audio":
        # Qwen2AudioProcessor looks these attributes up on the tokenizer.
        extra = {"audio_token": AUDIO_TOKEN, "audio_bos_token": AUDIO_BOS, "audio_eos_token": AUDIO_EOS}
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,  # chat models stop at <|im_end|>, as in Qwen's instruct checkpoints
        pad_token=ENDOFTEXT,
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    for name, token in extra.items():
        setattr(tokenizer, name, token)
    tokenizer.init_kwargs.update(extra)
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    return tokenizer


def _text_config_kwargs(
    tokenizer: Any, vocab_size: int, hidden_size: int, num_layers: int, max_positions: int, head_dim: int
) -> dict[str, Any]:
    heads = hidden_size // head_dim
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "pad_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        "use_cache": True,
    }


def _build_config(
    arch: str, tokenizer: Any, vocab_size: int, hidden_size: int, num_layers: int, head_dim: int
) -> Any:
    import transformers as tf

    if arch == "qwen3":
        return tf.Qwen3Config(
            head_dim=head_dim,
            **_text_config_kwargs(tokenizer, vocab_size, hidden_size, num_layers, 4096, head_dim),
        )
    if arch == "qwen2":
        return tf.Qwen2Config(
            **_text_config_kwargs(tokenizer, vocab_size, hidden_size, num_layers, 4096, head_dim)
        )
    # qwen2_audio: Whisper-like encoder over 30 s of 128-bin mel frames (1500 positions after the stride-2
    # conv, as in the real model, so the stock feature extractor's padding matches), a projector, Qwen2 LM.
    audio_config = tf.Qwen2AudioEncoderConfig(
        num_mel_bins=128,
        encoder_layers=num_layers,
        encoder_attention_heads=hidden_size // head_dim,
        encoder_ffn_dim=hidden_size * 2,
        d_model=hidden_size,
        max_source_positions=1500,
    )
    text_config = tf.Qwen2Config(
        **_text_config_kwargs(tokenizer, vocab_size, hidden_size, num_layers, 8192, head_dim)
    )
    return tf.Qwen2AudioConfig(
        audio_config=audio_config,
        text_config=text_config,
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    )


def _build_model(config: Any) -> Any:
    import transformers as tf

    classes = {
        "qwen3": tf.Qwen3ForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "qwen2_audio": tf.Qwen2AudioForConditionalGeneration,
    }
    return classes[config.model_type](config)


def _hub_layout(out_dir: Path) -> None:
    """Rename a saved Qwen2-Audio's language-model weights to the layout of the hub's checkpoints.

    transformers 5.19 writes them as ``language_model.model.model.*``; the hub's Qwen2-Audio (and what vLLM's
    loader maps) is ``language_model.model.*``, which transformers reads as well. vLLM refused the former:
    "There is no module or parameter named 'model' in Qwen2Model".
    """
    from safetensors.torch import load_file, save_file

    for path in out_dir.glob("*.safetensors"):
        weights = load_file(path)
        renamed = {
            k.replace("language_model.model.model.", "language_model.model.", 1): v
            for k, v in weights.items()
        }
        if renamed.keys() != weights.keys():
            save_file(renamed, path, metadata={"format": "pt"})


def build_tiny_model(
    out_dir: Path,
    arch: str = "qwen3",
    corpus: Iterable[str] = (),
    *,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    head_dim: int = DEFAULT_HEAD_DIM,
    seed: int = 0,
) -> TinyModel:
    """Write a random-initialised tiny ``arch`` model folder to ``out_dir`` and describe it.

    The same ``seed`` and corpus give identical weights and tokenizer. Attention heads are ``head_dim`` wide
    (``hidden_size // head_dim`` of them, so ``hidden_size`` must be a multiple of it); vLLM's CPU build runs
    32, 64, 80, 96, 112, 128, ... wide heads, not 16: ``build_tiny_model(out, arch, **VLLM_TINY_SIZE)``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny model arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if head_dim < 16 or head_dim % 16:
        raise ValueError(f"head_dim must be a positive multiple of 16, got {head_dim}")
    if hidden_size < head_dim or hidden_size % head_dim:
        raise ValueError(f"hidden_size must be a positive multiple of head_dim={head_dim}, got {hidden_size}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")

    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(arch, corpus, vocab_size)

    # Seed the global RNG right before construction: weight init draws from it, so this makes it reproducible
    # without disturbing the caller beyond restoring the previous RNG state afterwards.
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = _build_model(_build_config(arch, tokenizer, vocab_size, hidden_size, num_layers, head_dim))
    finally:
        torch.random.set_rng_state(rng_state)
    model = model.to(torch.float32).eval()

    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    if arch == "qwen2_audio":
        _hub_layout(out_dir)
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "head_dim": head_dim,
    }
    return _finish_folder(out_dir, arch, tokenizer, {"seed": seed, **sizes})


def _generation_config(tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    endoftext = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        max_new_tokens=256,
    )


def _finish_folder(out_dir: Path, arch: str, tokenizer: Any, marker: dict[str, Any]) -> TinyModel:
    """Tokenizer, Qwen2-Audio's processor and the marker beside a saved config (and weights, if any)."""
    tokenizer.save_pretrained(out_dir)
    if arch == "qwen2_audio":
        from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

        feature_extractor = WhisperFeatureExtractor(
            feature_size=128, sampling_rate=16000, return_attention_mask=True
        )
        processor = Qwen2AudioProcessor(
            feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
        )
        processor.save_pretrained(out_dir)
    model_type, template = _SWIFT_NAMES[arch]
    marker = {"arch": arch, "model_type": model_type, "template": template, **marker}
    marker["tokenizer_size"] = len(tokenizer)
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return TinyModel(path=out_dir, arch=arch, model_type=model_type, template=template)


# Qwen2-Audio-7B(-Instruct)'s shape, from its config.json on the hub: a Whisper-large encoder and a Qwen-7B
# language model. The GPU check serves this architecture with vLLM's dummy weights (load_format="dummy").
QWEN2_AUDIO_7B: dict[str, dict[str, Any]] = {
    "text": {
        "vocab_size": 156032,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
    },
    "audio": {
        "d_model": 1280,
        "encoder_layers": 32,
        "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120,
        "num_mel_bins": 128,
        "max_source_positions": 1500,
    },
}
# The same architecture at the tiny size vLLM's CPU build runs (heads 64 wide): the GPU check's CPU dry run.
QWEN2_AUDIO_VLLM_TINY: dict[str, dict[str, Any]] = {
    "text": {
        "vocab_size": 2048,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 8192,
    },
    "audio": {
        "d_model": 128,
        "encoder_layers": 2,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 256,
        "num_mel_bins": 128,
        "max_source_positions": 1500,
    },
}


def write_architecture(
    out_dir: Path, corpus: Iterable[str] = (), *, shape: dict[str, dict[str, Any]] = QWEN2_AUDIO_7B
) -> TinyModel:
    """A Qwen2-Audio model folder of the given shape without weights: config, tokenizer, processor, generation
    config and marker, for an engine that makes up its own weights (vLLM's ``load_format="dummy"``).

    The tokenizer is the tiny one (trained on `corpus`, at most 2048 tokens), which any vocabulary at least
    that large covers; the audio token is its ``<|AUDIO|>``.
    """
    import transformers as tf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text, audio = dict(shape["text"]), dict(shape["audio"])
    tokenizer = _build_tokenizer("qwen2_audio", corpus, min(2048, text["vocab_size"]))
    special = {
        "bos_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "pad_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
    }
    config = tf.Qwen2AudioConfig(
        audio_config=tf.Qwen2AudioEncoderConfig(**audio),
        text_config=tf.Qwen2Config(tie_word_embeddings=False, use_cache=True, **special, **text),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    )
    config.architectures = ["Qwen2AudioForConditionalGeneration"]  # what vLLM picks its model class by
    config.dtype = "bfloat16"  # the hub checkpoint's dtype: vLLM serves dummy weights in it
    config.save_pretrained(out_dir)
    _generation_config(tokenizer).save_pretrained(out_dir)
    return _finish_folder(out_dir, "qwen2_audio", tokenizer, {"weights": False, **text})


def load_tiny_model(path: Path) -> TinyModel:
    """Describe a folder previously written by :func:`build_tiny_model`."""
    path = Path(path)
    marker_path = path / MARKER_FILE
    if not marker_path.is_file():
        raise FileNotFoundError(f"{path} is not a tiny model folder (no {MARKER_FILE})")
    marker = json.loads(marker_path.read_text(encoding="utf-8"))
    arch = marker.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"{marker_path}: unknown arch {arch!r}")
    default_type, default_template = _SWIFT_NAMES[arch]
    return TinyModel(
        path=path,
        arch=arch,
        model_type=marker.get("model_type", default_type),
        template=marker.get("template", default_template),
    )
