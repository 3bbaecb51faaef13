"""The tiny model builder: folders that transformers (and so ms-swift) load, run and tokenize Chinese with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from teleguard.tiny_models import (
    ARCHS,
    MARKER_FILE,
    VLLM_TINY_SIZE,
    TinyModel,
    build_tiny_model,
    corpus_from_paths,
    load_tiny_model,
)

CHINESE = "您好，这里是银行客服中心，您的账户出现异常，请提供验证码。我怀疑这是诈骗电话。"
ANSWER = '<think>\n对方冒充客服索要验证码。\n</think>\n<answer>{"is_fraud": true, "conversation_stage": "complete"}</answer>'


def _text_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _greedy(model, inputs: dict, new_tokens: int) -> torch.Tensor:
    # min_new_tokens keeps a random model from stopping early on an eos token.
    return model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )


# ------------------------------------------------------------------------------------------------ text models


def test_text_model_loads_runs_and_generates(tiny_text_model: TinyModel) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_text_model.path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("qwen3", 2, 64)
    assert config.vocab_size == 2048

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model.path)
    model = _text_model(tiny_text_model.path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # tiny enough for CPU tests

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHINESE}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 2048)
    assert torch.isfinite(logits).all()

    out = _greedy(model, dict(inputs), 4)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_qwen2_builds_with_an_empty_corpus(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tiny = build_tiny_model(tmp_path / "q2", "qwen2", hidden_size=32, num_layers=1, vocab_size=1024)
    assert tiny.swift_args() == [
        "--model",
        str(tmp_path / "q2"),
        "--model_type",
        "qwen2",
        "--template",
        "qwen2_5",
    ]
    model = _text_model(tiny.path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (
        32,
        1,
        1024,
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny.path)
    # Built-in text alone must be enough for the reasoning tags and Chinese to round-trip.
    assert tokenizer.decode(tokenizer.encode(ANSWER)) == ANSWER
    assert tokenizer.decode(tokenizer.encode(CHINESE)) == CHINESE
    assert len(tokenizer) <= 1024
    ids = tokenizer(ANSWER, return_tensors="pt")
    assert _greedy(model, dict(ids), 3).shape[1] == ids["input_ids"].shape[1] + 3


def test_tokenizer_round_trips_and_has_qwen_special_tokens(tiny_text_model: TinyModel, tiny_corpus) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model.path)
    samples = [CHINESE, ANSWER, "混合 English, 数字 12345 and emoji 🙂\n第二行\t制表"]
    samples += tiny_corpus[:20]
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text

    # Merges were learned: common Chinese takes fewer tokens than its UTF-8 bytes.
    assert len(tokenizer.encode("诈骗电话")) < len("诈骗电话".encode())

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in specials]
    assert ids == sorted(ids) and len(set(ids)) == 3 and max(ids) < 2048
    for token, token_id in zip(specials, ids, strict=True):
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False)[1] == token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|AUDIO|>") in (None, tokenizer.unk_token_id)  # text-only model


def test_chat_template_renders_chatml(tiny_text_model: TinyModel) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model.path)
    messages = [
        {"role": "system", "content": "你是反诈助手。"},
        {"role": "user", "content": "这是诈骗吗？"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\n你是反诈助手。<|im_end|>\n<|im_start|>user\n这是诈骗吗？<|im_end|>\n<|im_start|>assistant\n"
    )
    no_think = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == text + "<think>\n\n</think>\n\n"
    generation_config = json.loads((tiny_text_model.path / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation_config["eos_token_id"]


# ------------------------------------------------------------------------------------------------ audio model


def test_audio_model_processor_forward_and_generate(tiny_audio_model: TinyModel, wav_file: Path) -> None:
    import soundfile as sf
    from transformers import (
        AutoModelForMultimodalLM,
        AutoProcessor,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    assert (tiny_audio_model.model_type, tiny_audio_model.template) == ("qwen2_audio", "qwen2_audio")
    processor = AutoProcessor.from_pretrained(tiny_audio_model.path)
    assert isinstance(processor, Qwen2AudioProcessor)
    assert isinstance(processor.feature_extractor, WhisperFeatureExtractor)
    assert processor.feature_extractor.feature_size == 128

    model = AutoModelForMultimodalLM.from_pretrained(tiny_audio_model.path).eval()
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert model.config.audio_token_id == audio_id
    assert model.config.audio_config.encoder_layers == 2 and model.config.audio_config.d_model == 64

    samples, rate = sf.read(wav_file, dtype="float32")
    mono = samples.mean(axis=1)  # the fixture is stereo; the feature extractor wants one channel
    messages = [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": str(wav_file)}, {"type": "text", "text": "诈骗？"}],
        }
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n诈骗？" in text
    inputs = processor(text=text, audio=[mono], sampling_rate=rate, return_tensors="pt")
    # 2 s = 200 mel frames -> 100 after the stride-2 conv -> 50 after pooling: one <|AUDIO|> each.
    assert int((inputs["input_ids"] == audio_id).sum()) == 50
    assert inputs["input_features"].shape == (1, 128, 3000)

    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 2048) and torch.isfinite(logits).all()
    out = _greedy(model, dict(inputs), 3)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_audio_tokenizer_has_audio_special_tokens(tiny_audio_model: TinyModel) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_audio_model.path)
    for token in [
        "<|audio_bos|>",
        "<|AUDIO|>",
        "<|audio_eos|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    ]:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] < 2048, token
    assert tokenizer.decode(tokenizer.encode(CHINESE)) == CHINESE


# ------------------------------------------------------------------------------------- marker, seeds, errors


def test_load_tiny_model_reads_the_marker(tiny_audio_model: TinyModel, tiny_text_model: TinyModel) -> None:
    assert load_tiny_model(tiny_audio_model.path) == tiny_audio_model
    assert load_tiny_model(tiny_text_model.path) == tiny_text_model
    marker = json.loads((tiny_text_model.path / MARKER_FILE).read_text())
    assert marker["arch"] == "qwen3" and marker["seed"] == 0


def test_load_tiny_model_rejects_other_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=MARKER_FILE):
        load_tiny_model(tmp_path)


def test_same_seed_same_model_and_tokenizer(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    corpus = ["您好，请问是张先生吗？", "我是快递公司的，您的包裹丢了。"] * 5
    kwargs = {"hidden_size": 32, "num_layers": 1, "vocab_size": 512}
    a = build_tiny_model(tmp_path / "a", "qwen3", corpus, seed=7, **kwargs)
    b = build_tiny_model(tmp_path / "b", "qwen3", iter(corpus), seed=7, **kwargs)
    c = build_tiny_model(tmp_path / "c", "qwen3", corpus, seed=8, **kwargs)

    weights_a, weights_b, weights_c = (load_file(m.path / "model.safetensors") for m in (a, b, c))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    assert (a.path / "tokenizer.json").read_bytes() == (b.path / "tokenizer.json").read_bytes()


def test_building_does_not_disturb_the_callers_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", "qwen3", hidden_size=16, num_layers=1, vocab_size=512)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2-audio", "", "QWEN3"])
def test_unknown_arch_is_a_clear_error(tmp_path: Path, arch: str) -> None:
    with pytest.raises(ValueError, match="unknown tiny model arch") as info:
        build_tiny_model(tmp_path / "x", arch)
    assert all(name in str(info.value) for name in ARCHS)
    assert not (tmp_path / "x").exists()


def test_bad_sizes_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        build_tiny_model(tmp_path / "x", "qwen3", hidden_size=40)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model(tmp_path / "x", "qwen3", vocab_size=100)


def test_corpus_from_paths_reads_txt_lines_and_nested_jsonl_strings(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("第一行\n\n  第二行  \n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    rows = [
        {
            "left": ["喂，您好", "请转账"],
            "right": ["好的"],
            "user_age": 30,
            "meta": {"fraud_type": "客服诈骗"},
        },
        {"empty": "", "flag": True, "nested": [[{"deep": "最里层"}]]},
    ]
    jsonl.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{truncated", encoding="utf-8"
    )
    (tmp_path / "c.csv").write_text("ignored,row\n", encoding="utf-8")

    got = list(corpus_from_paths([txt, jsonl, tmp_path / "c.csv"]))
    assert got == ["第一行", "第二行", "喂，您好", "请转账", "好的", "客服诈骗", "最里层"]


def test_head_dim_is_an_option_and_the_default_size_is_unchanged(tmp_path: Path) -> None:
    from transformers import AutoConfig

    small = {"num_layers": 1, "vocab_size": 512}
    default = AutoConfig.from_pretrained(build_tiny_model(tmp_path / "d", "qwen3", **small).path)
    assert (default.hidden_size, default.num_attention_heads, default.head_dim) == (64, 4, 16)
    # the size vLLM's CPU build runs (its attention refuses heads 16 wide)
    for arch in ("qwen2", "qwen3"):
        config = AutoConfig.from_pretrained(
            build_tiny_model(tmp_path / arch, arch, **small, **VLLM_TINY_SIZE).path
        )
        heads = config.num_attention_heads
        assert (config.hidden_size, heads, config.hidden_size // heads) == (128, 2, 64)
    audio = AutoConfig.from_pretrained(
        build_tiny_model(tmp_path / "a", "qwen2_audio", **small, **VLLM_TINY_SIZE).path
    )
    assert audio.text_config.num_attention_heads == 2 and audio.audio_config.encoder_attention_heads == 2
    with pytest.raises(ValueError, match="multiple of head_dim"):
        build_tiny_model(tmp_path / "bad", "qwen3", hidden_size=96, head_dim=64)


def test_qwen2_audio_weights_are_in_the_hub_layout(tiny_audio_model: TinyModel) -> None:
    from safetensors import safe_open

    # as the hub's Qwen2-Audio checkpoints (vLLM's loader maps these; transformers 5 reads both)
    with safe_open(tiny_audio_model.path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.embed_tokens.weight" in keys
    assert not any(k.startswith("language_model.model.model.") for k in keys)
