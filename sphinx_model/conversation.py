"""Multi-turn dialogues: the LLaVA / SPHINX item format, the chat template, answer-only token masks.

Item format (one JSON object; a dataset is a JSON array of them or JSONL, one per line)::

    {"image": "coco/0001.jpg",          # optional; a path, or a list of paths (several images)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Roles: ``human`` / ``user`` and ``gpt`` / ``assistant``, alternating from a human turn; an optional
first ``system`` turn replaces the template's system line. ``<image>`` placeholders are removed:
every image of a sample goes right after its BOS token, as in the SPHINX reference (the layout
places them, ``text_before_images = 1``). A value must be a string (numbers are accepted as their
text); a turn empty after removing placeholders is an error, except a first human turn that held
only the image.

The template is the SPHINX reference's (LLaMA2-Accessory's default conversation, single separator)::

    {system}\\n\\n### Human: {q1}\\n### Assistant: {a1}\\n### Human: {q2}\\n### Assistant: ...

The loss is on each answer and its closing separator (`` {a}\\n###``), so the model learns where to
stop; the generation prompt is the same text up to `` Assistant:``. Text is tokenised segment by
segment (each segment after the first starting at a space, encoded as a continuation), which gives
the tokens of the whole string encoded at once, the answer mask exactly on the answer segments, and
a generation prompt whose tokens are the prefix of the trained ones.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sphinx_model.tokenizer import Tokenizer

__all__ = [
    "ASSISTANT",
    "IMAGE_PLACEHOLDER",
    "SPHINX_TEMPLATE",
    "USER",
    "ChatTemplate",
    "Conversation",
    "InvalidConversation",
    "Turn",
    "encode_conversation",
    "encode_prompt",
    "parse_conversation",
]

USER, ASSISTANT = "user", "assistant"
IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}


@dataclass(frozen=True)
class Turn:
    role: str   # USER or ASSISTANT
    text: str


@dataclass
class Conversation:
    """A parsed item: its image paths (as written, relative to the dataset's root), its turns
    (alternating, from a user turn), and the system line if the item sets one."""

    turns: list[Turn]
    images: list[str] = field(default_factory=list)
    system: str | None = None


class InvalidConversation(ValueError):
    """An item that is not a valid dialogue; the message says what is wrong."""


@dataclass(frozen=True)
class ChatTemplate:
    """The conversation template (defaults: the SPHINX reference's)."""

    system: str = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's "
                   "questions.")
    user: str = "Human"
    assistant: str = "Assistant"
    sep: str = "###"

    @property
    def stop_text(self) -> str:
        """The text that ends an answer: generation stops once it has been produced."""
        return "\n" + self.sep

    def segments(self, turns: Sequence[Turn], system: str | None = None,
                 generation: bool = False) -> list[tuple[str, bool]]:
        """The rendered dialogue as ``(text, is_answer)`` segments; their concatenation is the
        whole text. ``generation``: end with the assistant's cue, where the answer is generated
        (``turns`` then ends with a user turn)."""
        system = self.system if system is None else system
        out = [(f"{system}\n\n{self.sep}", False)]
        for turn in turns:
            if turn.role == USER:
                out.append((f" {self.user}: {turn.text}\n{self.sep}", False))
            else:
                out.append((f" {self.assistant}:", False))
                out.append((f" {turn.text}\n{self.sep}", True))
        if generation:
            out.append((f" {self.assistant}:", False))
        return out

    def render(self, turns: Sequence[Turn], system: str | None = None,
               generation: bool = False) -> str:
        """The dialogue as text (what :func:`encode_conversation` tokenises, BOS excluded)."""
        return "".join(text for text, _ in self.segments(turns, system, generation))

    def answer_text(self, generated: str) -> str:
        """The answer in generated text: cut at the stop text, surrounding spaces removed."""
        return generated.split(self.stop_text, 1)[0].strip()


SPHINX_TEMPLATE = ChatTemplate()


def parse_conversation(item: Any) -> Conversation:
    """Validates one dataset item (see the module docstring); ``InvalidConversation`` says why
    not."""
    if not isinstance(item, dict):
        raise InvalidConversation(f"an item must be a JSON object, got {type(item).__name__}")
    images = item.get("image")
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise InvalidConversation(f"'image' must be a path or a list of paths, got {images!r:.80}")
    raw = item.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise InvalidConversation(f"'conversations' must be a non-empty list, got {raw!r:.80}")
    system, turns = None, []
    for k, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise InvalidConversation(f"conversations[{k}] must be an object, got {entry!r:.80}")
        role, value = entry.get("from"), entry.get("value")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise InvalidConversation(f"conversations[{k}].value must be a string, got "
                                      f"{type(value).__name__}")
        if k == 0 and role == "system":
            system = value.strip()
            continue
        if role not in _ROLES:
            raise InvalidConversation(f"conversations[{k}].from = {role!r}; expected one of "
                                      f"{', '.join(_ROLES)}")
        expected = USER if len(turns) % 2 == 0 else ASSISTANT
        if _ROLES[role] != expected:
            article = "an" if _ROLES[role] == ASSISTANT else "a"
            raise InvalidConversation(f"conversations[{k}] is {article} {_ROLES[role]} turn, "
                                      f"expected {expected} (turns alternate, from the user)")
        text = value.replace(IMAGE_PLACEHOLDER, "").strip()
        image_only = not text and images and not turns and IMAGE_PLACEHOLDER in value
        if not text and not image_only:
            raise InvalidConversation(f"conversations[{k}] ({_ROLES[role]}) is empty")
        turns.append(Turn(expected, text))
    if not any(t.role == ASSISTANT for t in turns):
        raise InvalidConversation("the conversation has no assistant turn (nothing to train on)")
    return Conversation(turns, images, system)


def encode_conversation(tokenizer: Tokenizer, turns: Sequence[Turn],
                        template: ChatTemplate = SPHINX_TEMPLATE, system: str | None = None
                        ) -> tuple[list[int], list[bool]]:
    """Token ids of the whole dialogue, BOS first, and the answer mask (True on the tokens of each
    assistant answer and its closing separator: the tokens the loss is computed on)."""
    return _encode_segments(tokenizer, template.segments(turns, system))


def encode_prompt(tokenizer: Tokenizer, turns: Sequence[Turn],
                  template: ChatTemplate = SPHINX_TEMPLATE, system: str | None = None) -> list[int]:
    """Token ids of the dialogue so far, BOS first, ending where the assistant answers: what the
    chat CLI feeds the model. ``turns`` alternate from a user turn and end with one."""
    if not turns or turns[-1].role != USER:
        raise ValueError("turns must end with a user turn (the question to answer)")
    for k, turn in enumerate(turns):
        if turn.role != (USER if k % 2 == 0 else ASSISTANT):
            raise ValueError(f"turns[{k}] is a {turn.role!r} turn; turns alternate from the user")
    return _encode_segments(tokenizer, template.segments(turns, system, generation=True))[0]


def _encode_segments(tokenizer: Tokenizer, segments: Sequence[tuple[str, bool]]
                     ) -> tuple[list[int], list[bool]]:
    """BOS, then each segment's tokens (the first at the start of a sequence, the rest as
    continuations), with each segment's answer flag on its tokens."""
    ids, mask = [tokenizer.bos_id], [False]
    for k, (text, answer) in enumerate(segments):
        piece = tokenizer.encode(text) if k == 0 else tokenizer.encode_continuation(text)
        ids.extend(piece)
        mask.extend([answer] * len(piece))
    return ids, mask
