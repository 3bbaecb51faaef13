"""The serving profile: how a trained model must be asked, written into its folder so that serving asks it so.

A model answers best with the prompts and the transcript window it was trained on, at the policy points its
evaluation measured. The export step writes both files below into every exported model folder (the registry
copies them with the model); `teleguard serve --model DIR` reads them, and an option or `--config` field that is
given explicitly still wins over the profile.

    <model>/teleguard-serving.yaml   the profile: language, modality, the decision policy's settings
    <model>/teleguard-prompts.yaml   the whole prompt set training used (every text, not a file reference)

The profile's `policy` section holds `DecisionPolicy` fields (teleguard.serve.policy), validated by that model,
so a profile can never set something the detector does not know.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from teleguard.contract import PromptSet
from teleguard.contract.prompts import write_prompt_set
from teleguard.yaml_files import field_errors, read_mapping

PROFILE_FILE = "teleguard-serving.yaml"
PROMPTS_FILE = "teleguard-prompts.yaml"
PROFILE_VERSION = 1
# what a profile may fix (the rest of DecisionPolicy is the operator's: limits, monitoring after an alert)
POLICY_FIELDS = (
    "system",
    "chain_scene",
    "max_transcript_chars",
    "every_seconds",
    "on_turn",
    "min_turns",
    "min_audio_seconds",
    "ask_scene",
    "alert_threshold",
    "max_tokens",
)


class ProfileError(ValueError):
    """A serving profile that cannot be used, naming the file and the field."""


class ServingProfile(BaseModel):
    """What `teleguard-serving.yaml` holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = PROFILE_VERSION
    language: Literal["zh", "en"] = "zh"
    modality: Literal["text", "audio"] = "text"
    policy: dict[str, Any] = Field(default_factory=dict)
    # where the settings came from: the recipe, the data build knobs
    source: dict[str, Any] = Field(default_factory=dict)

    @field_validator("policy")
    @classmethod
    def _known_fields(cls, policy: dict[str, Any]) -> dict[str, Any]:
        from teleguard.serve.policy import DecisionPolicy

        unknown = sorted(set(policy) - set(POLICY_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown policy field(s) {', '.join(unknown)} (allowed: {', '.join(POLICY_FIELDS)})"
            )
        DecisionPolicy.model_validate(policy)  # the detector's own checks, now rather than at serving time
        return policy


def write_profile(model_dir: Path, profile: ServingProfile, prompts: PromptSet) -> Path:
    """Write the profile and the whole prompt set into a model folder; returns the profile's path."""
    model_dir.mkdir(parents=True, exist_ok=True)
    write_prompt_set(model_dir / PROMPTS_FILE, prompts)
    path = model_dir / PROFILE_FILE
    header = (
        "# How this model must be asked: written by teleguard's export step, read by `teleguard serve`.\n"
    )
    path.write_text(
        header + yaml.safe_dump(profile.model_dump(mode="json"), allow_unicode=True, sort_keys=False), "utf-8"
    )
    return path


def read_profile(model_dir: Path) -> ServingProfile | None:
    """The folder's profile, None when it has none; ProfileError (file and field) when it is unusable."""
    path = model_dir / PROFILE_FILE
    if not path.is_file():
        return None
    raw = read_mapping(path, "serving profile", ProfileError)
    try:
        profile = ServingProfile.model_validate(raw)
    except ValidationError as err:
        raise ProfileError(f"{path}: " + "; ".join(field_errors(err))) from None
    if not (model_dir / PROMPTS_FILE).is_file():
        raise ProfileError(f"{path}: the prompts it refers to, {model_dir / PROMPTS_FILE}, are missing")
    return profile


def profile_policy(model_dir: Path, profile: ServingProfile) -> dict[str, Any]:
    """The DecisionPolicy fields the profile sets, with the prompt file of the folder."""
    return {
        **profile.policy,
        "language": profile.language,
        "modality": profile.modality,
        "prompts_file": str((model_dir / PROMPTS_FILE).resolve()),
    }


def apply_profile(model_dir: Path, policy: Any) -> tuple[Any, ServingProfile | None]:
    """The policy to serve `model_dir` with: the profile's settings, then every field the operator set
    explicitly (`policy.model_fields_set`: from --config or an option). Returns (policy, profile or None)."""
    from teleguard.serve.policy import DecisionPolicy

    profile = read_profile(model_dir)
    if profile is None:
        return policy, None
    explicit = policy.model_dump(include=policy.model_fields_set)
    return DecisionPolicy.model_validate({**profile_policy(model_dir, profile), **explicit}), profile


def describe(profile: ServingProfile | None, model_dir: Path) -> str:
    """One line for the server's start-up log."""
    if profile is None:
        return (
            f"{model_dir} has no serving profile ({PROFILE_FILE}): serving with the built-in prompts and "
            "default policy unless options say otherwise; a model asked differently from its training "
            "answers worse (export it with teleguard's export step to get one)"
        )
    p = profile.policy
    points = ", ".join(
        part
        for part in (
            "each finished turn" if p.get("on_turn", True) else "",
            f"every {p['every_seconds']:g} s" if p.get("every_seconds") else "",
        )
        if part
    )
    return (
        f"serving profile {model_dir / PROFILE_FILE}: {profile.language} prompts ({PROMPTS_FILE}), "
        f"{profile.modality}, transcript window {p.get('max_transcript_chars') or 'whole'} characters, "
        f"evaluating at {points or 'the default points'}, alert threshold {p.get('alert_threshold', 0.5):g}, "
        f"max tokens {p.get('max_tokens', 'default')}"
    )


def profile_for_build(
    serving: Any, datasets: Path, *, modality: str, source: dict[str, Any], train_split: str = "train"
) -> tuple[ServingProfile, PromptSet]:
    """The profile of a model trained on `datasets` (a `teleguard data build` folder): its prompt set and
    transcript window from the build, policy points and threshold from the recipe's `serving` section."""
    import json

    from teleguard.contract import load_prompts
    from teleguard.data.dataset import PROMPTS_FILE

    prompts_file = datasets / PROMPTS_FILE
    card_file = datasets / train_split / "card.json"
    card = json.loads(card_file.read_text("utf-8")) if card_file.is_file() else {}
    prompts = load_prompts(prompts_file if prompts_file.is_file() else card.get("language"))
    policy = {
        "chain_scene": bool(card.get("chain_scene", False)),
        "max_transcript_chars": card.get("max_transcript_chars"),
        **serving.model_dump(),  # every_seconds None too: it switches the time points off
    }
    if policy["max_tokens"] is None:
        del policy["max_tokens"]
    if policy["chain_scene"]:  # the chained is_fraud round follows a scene round, which must then be asked
        policy["ask_scene"] = "always"
    build = {k: card[k] for k in ("max_transcript_chars", "evidence_chars", "chain_scene") if k in card}
    return (
        ServingProfile(
            language=prompts.language,
            modality=modality,  # type: ignore[arg-type]
            policy=policy,
            source={**source, "data_build": build},
        ),
        prompts,
    )
