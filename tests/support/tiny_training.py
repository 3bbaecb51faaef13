"""Teach a tiny model fixed answers to fixed chat prompts, in plain torch/transformers (a test helper).

A random tiny model (teleguard.tiny_models) answers noise. Tests that need a model whose answers are known (a
confident answer to one prompt, an unsure one to another) overfit it on those (prompt, answer) pairs: the prompt
rendered with the model's chat template as ms-swift renders it for inference (non-thinking Qwen3: an empty
think block opens the reply), the loss on the answer and the end-of-turn token only. Training stops once every
answer token is the model's most likely next token with a margin, so greedy decoding reproduces each answer.

A prompt given twice with answers that part somewhere (`false` vs `true`) teaches the model to be torn there:
where examples with the same tokens so far disagree on the next one, no margin is asked, and the loss pulls
the model towards even odds between them; everywhere else the margin holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from teleguard.tiny_models import IM_END

Messages = list[dict[str, str]]


def render_prompt(tokenizer: Any, messages: Messages) -> str:
    """The prompt text ms-swift's qwen3 template gives for inference (system, user, assistant opening)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def teach_answers(
    model_dir: Path,
    examples: Sequence[tuple[Messages, str]],
    *,
    max_steps: int = 400,
    lr: float = 3e-3,
    margin: float = 2.0,
    seed: int = 0,
) -> int:
    """Overfit the model in `model_dir` on `examples` and save it there. Returns the optimizer steps taken.

    Stops when, for every answer token, the logit of the right token beats every other by `margin` (greedy
    decoding then reproduces the answers despite batching noise); AssertionError after `max_steps` without.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    end = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.pad_token_id
    sequences, labels = [], []
    for messages, answer in examples:
        prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        target = [*tokenizer(answer, add_special_tokens=False)["input_ids"], end]
        sequences.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    targets = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    # position t predicts token t + 1
    shifted = targets[:, 1:]
    answer_positions = shifted != -100
    # contested positions: another example has the same tokens up to here and a different next token
    following: dict[tuple[int, ...], set[int]] = {}
    answer_steps = [
        [t for t in range(1, len(s)) if x[t] != -100] for s, x in zip(sequences, labels, strict=True)
    ]
    for s, steps in zip(sequences, answer_steps, strict=True):
        for t in steps:
            following.setdefault(tuple(s[:t]), set()).add(s[t])
    for row, (s, steps) in enumerate(zip(sequences, answer_steps, strict=True)):
        for t in steps:
            if len(following[tuple(s[:t])]) > 1:
                answer_positions[row, t - 1] = False

    # logits only from the position before the earliest answer token on: the vocabulary projection of every
    # prompt position was most of a step's time, and those positions are never scored
    keep = width - min(len(s) - len(x) for s, x in zip(sequences, answer_steps, strict=True)) + 1
    shifted, answer_positions = shifted[:, width - keep :], answer_positions[:, width - keep :]

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    steps = 0
    with torch.enable_grad():
        while True:
            logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep).logits[:, :-1]
            with torch.no_grad():
                right = logits.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                others = logits.scatter(-1, shifted.clamp(min=0).unsqueeze(-1), float("-inf")).amax(-1)
                if bool(((right - others) > margin)[answer_positions].all()):
                    break
            if steps >= max_steps:
                raise AssertionError(f"the tiny model did not learn its answers in {max_steps} steps")
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    model.eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    return steps
