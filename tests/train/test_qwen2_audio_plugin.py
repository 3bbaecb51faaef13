"""The Qwen2-Audio plugin for ms-swift, in process: registration, idempotence, template expansion."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from teleguard.plugins import QWEN2_AUDIO_PLUGIN

pytest.importorskip("swift")


@pytest.fixture(scope="module")
def plugin():
    from swift.utils import import_external_file

    # Exactly how `--external_plugins` loads it (a hashed module name), then once more as a package module.
    return import_external_file(str(QWEN2_AUDIO_PLUGIN))


def test_registers_transformers5_module_keys(plugin) -> None:
    from swift.model import MODEL_ARCH_MAPPING, MODEL_MAPPING

    keys = MODEL_MAPPING["qwen2_audio"].model_arch
    assert keys is MODEL_ARCH_MAPPING["qwen2_audio"]
    assert keys.language_model == ["model.language_model", "lm_head"]
    assert keys.aligner == ["model.multi_modal_projector"]
    assert keys.vision_tower == ["model.audio_tower"]
    assert not any(r.startswith("transformers") for r in MODEL_MAPPING["qwen2_audio"].requires)


def test_importing_twice_changes_nothing(plugin) -> None:
    from swift.model import MODEL_MAPPING
    from swift.template import TEMPLATE_MAPPING

    before = (
        TEMPLATE_MAPPING["qwen2_audio"],
        TEMPLATE_MAPPING["qwen2_audio"].template_cls,
        MODEL_MAPPING["qwen2_audio"],
    )
    again = importlib.import_module("teleguard.plugins.swift_qwen2_audio")
    again.apply()
    plugin.apply()
    after = (
        TEMPLATE_MAPPING["qwen2_audio"],
        TEMPLATE_MAPPING["qwen2_audio"].template_cls,
        MODEL_MAPPING["qwen2_audio"],
    )
    assert after == before and after[1] is before[1]
    # No subclass-of-a-subclass stacking: exactly one patched class above ms-swift's own template.
    assert after[1].__mro__[1].__module__ == "swift.template.templates.qwen"


def test_audio_output_lengths_matches_the_encoder(plugin, tiny_audio_model) -> None:
    from transformers import AutoConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    encoder = Qwen2AudioEncoder(AutoConfig.from_pretrained(tiny_audio_model.path).audio_config)
    frames = torch.tensor([1, 2, 3, 199, 200, 201, 3000])
    assert torch.equal(
        plugin.audio_output_lengths(frames), encoder._get_feat_extract_output_lengths(frames)[1]
    )


@pytest.fixture(scope="module")
def swift_model_and_template(plugin, tiny_audio_model):
    from swift import get_model_processor, get_template

    model, processor = get_model_processor(
        str(tiny_audio_model.path), model_type="qwen2_audio", torch_dtype=torch.float32, download_model=False
    )
    return model.eval(), get_template(processor, template_type="qwen2_audio")


def test_template_expands_one_audio_token_per_frame_and_model_runs(
    swift_model_and_template, wav_file: Path
) -> None:
    model, template = swift_model_and_template
    template.set_mode("train")
    audio_id = template.processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    row = {
        "messages": [
            {"role": "user", "content": "<audio>这通电话是诈骗吗？"},
            {"role": "assistant", "content": '<answer>{"is_fraud": true}</answer>'},
        ],
        "audios": [str(wav_file)],
    }
    encoded = template.encode(row)
    assert encoded["input_ids"].count(audio_id) == 50  # 2 s of audio
    assert len(encoded["labels"]) == len(encoded["input_ids"])
    # The expanded placeholders are prompt tokens: never trained on.
    assert all(
        label == -100
        for i, label in zip(encoded["input_ids"], encoded["labels"], strict=True)
        if i == audio_id
    )

    batch = template.data_collator([encoded])
    with torch.no_grad():
        out = model(**batch)
    # The non-legacy path keeps the sequence length, so logits line up with the template's labels.
    assert out.logits.shape[1] == batch["input_ids"].shape[1]
    assert torch.isfinite(out.loss)


def test_generation_works_without_an_attention_mask_in_forward(
    swift_model_and_template, wav_file: Path
) -> None:
    # transformers 5 generate() calls forward with attention_mask=None; the unexpanded prompt crashed there.
    model, template = swift_model_and_template
    template.set_mode("transformers")
    encoded = template.encode(
        {"messages": [{"role": "user", "content": "<audio>诈骗？"}], "audios": [str(wav_file)]}
    )
    batch = template.data_collator([encoded])
    batch.pop("labels", None)
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
