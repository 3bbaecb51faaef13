"""ms-swift 4 plugin: make Qwen2-Audio trainable under transformers 5.

Load with ``swift sft|rlhf ... --external_plugins src/teleguard/plugins/swift_qwen2_audio.py``. ms-swift 4.6
registers ``qwen2_audio`` for transformers 4.45-4.48 only; with transformers 5 two things break, and this file
re-registers the existing ``qwen2_audio`` model/template entries through ms-swift's public registration APIs
(``register_model_arch``/``register_model``/``register_template`` with ``exist_ok=True``):

1. Module keys (model arch). transformers 5 moved the sub-modules of ``Qwen2AudioForConditionalGeneration``
   under ``model.``: ``model.language_model`` (+ top-level ``lm_head``), ``model.multi_modal_projector`` and
   ``model.audio_tower``. ms-swift's arch still names ``language_model``/``multi_modal_projector``/
   ``audio_tower``, so ``--tuner_type lora`` fails with "Target modules ^(language_model(?=\\.).*...) not found
   in the base model", and ``--freeze_llm/--freeze_vit/--freeze_aligner`` would silently match nothing. The
   fix registers the new paths (same shape as ms-swift's own qwen2_vl entry for transformers >= 4.52) and drops
   the stale ``transformers<4.49`` requirement that only produced a misleading warning.

2. Audio placeholder expansion (template). ms-swift's Qwen2-Audio template emits a single ``<|AUDIO|>`` per
   audio and leaves it to the model's *legacy* merge path, which (a) needs the 2-D attention mask, but
   transformers 5 ``generate()`` calls ``forward`` with ``attention_mask=None``, so the GRPO rollout dies with
   "'NoneType' object is not subscriptable" in ``_merge_input_ids_with_audio_features``; and (b) grows the
   sequence inside ``forward``, so logits no longer line up with the template's labels / completion mask. The
   fix expands ``<|AUDIO|>`` in the template to one token per audio frame after the encoder's pooling
   (``((L - 1) // 2 + 1 - 2) // 2 + 1`` for ``L`` valid mel frames, as ``Qwen2AudioProcessor`` does), padding
   labels with -100. The model then takes the non-legacy ``masked_scatter`` path, which needs no mask. In
   vllm/lmdeploy/sglang mode the template is left as it was, since those engines expand the placeholder.

Importing the file twice (ms-swift imports it under a hashed module name; tests may import it as a package
module too) is harmless: each fix checks whether it is already in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from swift.model import MODEL_ARCH_MAPPING, MODEL_MAPPING, MultiModelKeys, register_model, register_model_arch
from swift.template import TEMPLATE_MAPPING, register_template

QWEN2_AUDIO = "qwen2_audio"  # ms-swift's model_type, model_arch and template name
AUDIO_TOKEN = "<|AUDIO|>"

# Inference engines whose own Qwen2-Audio processing replaces the single placeholder; left as upstream.
_ENGINES_THAT_EXPAND = frozenset({"vllm", "lmdeploy", "sglang"})

# Marker on our template subclass so a second import recognises its own (or a sibling copy's) patch.
_PATCH_MARKER = "_teleguard_expands_audio_tokens"


def _transformers_nests_under_model() -> bool:
    """True when Qwen2AudioForConditionalGeneration keeps its parts under ``.model`` (transformers >= 5)."""
    try:
        from transformers.models.qwen2_audio import modeling_qwen2_audio
    except ImportError:
        return False
    return hasattr(modeling_qwen2_audio, "Qwen2AudioModel")


def audio_output_lengths(feature_lengths: Any) -> Any:
    """Number of LM tokens one audio yields from ``feature_lengths`` valid mel frames (tensor or int):
    stride-2 conv then stride-2 average pooling, as in ``Qwen2AudioEncoder._get_feat_extract_output_lengths``."""
    after_conv = (feature_lengths - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def _fix_model_arch() -> None:
    if not _transformers_nests_under_model():
        return
    current = MODEL_ARCH_MAPPING.get(QWEN2_AUDIO)
    if current is None or current.language_model != ["model.language_model", "lm_head"]:
        register_model_arch(
            MultiModelKeys(
                QWEN2_AUDIO,
                language_model=["model.language_model", "lm_head"],
                aligner="model.multi_modal_projector",
                vision_tower="model.audio_tower",
            ),
            exist_ok=True,
        )
    meta = MODEL_MAPPING.get(QWEN2_AUDIO)
    if meta is None:
        raise RuntimeError("ms-swift has no 'qwen2_audio' model registered; this plugin targets ms-swift 4.x")
    # register_model resolves model_arch to the keys object at registration time, so the ModelMeta must be
    # registered again to pick up the new keys; every other field is kept as ms-swift defines it.
    if meta.model_arch is not MODEL_ARCH_MAPPING[QWEN2_AUDIO]:
        requires = [r for r in meta.requires if not r.replace(" ", "").startswith("transformers")]
        register_model(
            dataclasses.replace(meta, model_arch=QWEN2_AUDIO, requires=requires or ["librosa"]), exist_ok=True
        )


def _make_template_cls(base: type) -> type:
    from swift.template.utils import findall

    class Qwen2AudioExpandedTemplate(base):  # type: ignore[misc, valid-type]
        """ms-swift's Qwen2-Audio template, with ``<|AUDIO|>`` expanded to one token per audio frame."""

        def _encode(self, inputs: Any) -> dict[str, Any]:
            encoded = super()._encode(inputs)
            feature_mask = encoded.get("feature_attention_mask")
            if feature_mask is None or self.mode in _ENGINES_THAT_EXPAND:
                return encoded  # text-only sample, or an engine that expands placeholders itself
            audio_token_id = self.processor.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
            input_ids = encoded["input_ids"]
            idx_list = findall(input_ids, audio_token_id)
            num_tokens = audio_output_lengths(feature_mask.sum(-1)).tolist()
            if len(idx_list) != len(num_tokens):
                raise ValueError(
                    f"{len(idx_list)} {AUDIO_TOKEN} placeholders but {len(num_tokens)} audios; "
                    "use exactly one <audio> tag per entry in `audios`"
                )

            def new_tokens(i: int) -> list[int]:
                return [audio_token_id] * int(num_tokens[i])

            input_ids, labels, loss_scale = self._extend_tokens(
                input_ids, encoded.get("labels"), encoded.get("loss_scale"), idx_list, new_tokens
            )
            encoded["input_ids"] = input_ids
            encoded["labels"] = labels
            encoded["loss_scale"] = loss_scale
            return encoded

    setattr(Qwen2AudioExpandedTemplate, _PATCH_MARKER, True)
    return Qwen2AudioExpandedTemplate


def _fix_template() -> None:
    meta = TEMPLATE_MAPPING.get(QWEN2_AUDIO)
    if meta is None:
        raise RuntimeError(
            "ms-swift has no 'qwen2_audio' template registered; this plugin targets ms-swift 4.x"
        )
    if getattr(meta.template_cls, _PATCH_MARKER, False):
        return
    register_template(
        dataclasses.replace(meta, template_cls=_make_template_cls(meta.template_cls)), exist_ok=True
    )


def apply() -> None:
    """Apply both fixes; safe to call any number of times."""
    _fix_model_arch()
    _fix_template()


apply()
