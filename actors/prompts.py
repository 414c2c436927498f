"""What a prompt is, and the one function that turns prompts into the token ids an engine generates from.

A prompt is a text (`prompt`) or a chat (`messages`, a list of {role, content}). `render_all` is the only place
where either becomes token ids: the launcher renders every row once when it loads the data (its length check
measures exactly what the engine will see), and the generator samples from those ids and stores them in each
Rollout, so training, evaluation, in-flight generation and every later reader share one rendering. A chat goes
through the tokenizer's chat template with `add_generation_prompt=True`; a text prompt does too when
`apply_chat_template` says so (`auto`: when the tokenizer has a template), else it is tokenized as is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Message = dict[str, str]  # {"role": "system" | "user" | "assistant" | ..., "content": str}


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # the text prompt; for a chat, the content of its last user turn (what a reward calls the prompt)
    answer: str  # the reference a verifiable reward compares against; "" when the data has none
    messages: list[Message] | None = None  # a chat prompt (rendered through the chat template), else None
    data_source: str = ""  # the row's source tag: routes its reward (actors.reward as a mapping), tags its rollouts
    metadata: dict[str, Any] = field(default_factory=dict)  # the row's other fields, handed to the reward
    token_ids: list[int] | None = None  # the rendering the engine generates from (set by the launcher's loader)

    def chat(self) -> list[Message]:
        """The prompt as a chat: its messages, or its text as one user turn."""
        return list(self.messages) if self.messages is not None else [{"role": "user", "content": self.text}]


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are rendered (the run's `data.apply_chat_template` and `data.system_prompt`)."""

    apply_chat_template: bool | Literal["auto"] = "auto"  # for text prompts; a chat always uses the template
    system_prompt: str | None = None  # prepended as a system turn unless the chat already starts with one


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_template(tokenizer, prompt: Prompt, fmt: PromptFormat) -> bool:
    if prompt.messages is not None:
        return True
    return has_chat_template(tokenizer) if fmt.apply_chat_template == "auto" else bool(fmt.apply_chat_template)


def render_text(tokenizer, prompt: Prompt, fmt: PromptFormat) -> str:
    """The prompt as the text the model reads (chat template applied where it applies)."""
    if not uses_template(tokenizer, prompt, fmt):
        if fmt.system_prompt:
            raise ValueError("data.system_prompt needs a chat template: the text prompts are rendered without one "
                             "(data.apply_chat_template false, or a tokenizer without a template)")
        return prompt.text
    if not has_chat_template(tokenizer):
        what = "a chat (messages)" if prompt.messages is not None else "data.apply_chat_template true"
        raise ValueError(f"prompt {prompt.id}: {what} needs a chat template, and this tokenizer has none")
    chat = prompt.chat()
    if fmt.system_prompt and not (chat and chat[0].get("role") == "system"):
        chat = [{"role": "system", "content": fmt.system_prompt}, *chat]
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def render_all(tokenizer, prompts: list[Prompt], fmt: PromptFormat = PromptFormat()) -> list[list[int]]:
    """Token ids of each prompt: its stored rendering where it has one, else rendered now (one tokenizer call).
    The template's text carries its own special tokens, so none are added (as `apply_chat_template` does)."""
    todo = [i for i, p in enumerate(prompts) if p.token_ids is None]
    out = [list(p.token_ids) if p.token_ids is not None else [] for p in prompts]
    if todo:
        texts = [render_text(tokenizer, prompts[i], fmt) for i in todo]
        for i, ids in zip(todo, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            out[i] = list(ids)
    return out
