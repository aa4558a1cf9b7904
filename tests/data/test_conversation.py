"""The chat template: item validation, the SPHINX reference's text, answer-only masks, the
generation prompt."""
import pytest

from sphinx_model.conversation import (
    ASSISTANT,
    SPHINX_TEMPLATE,
    USER,
    InvalidConversation,
    Turn,
    encode_conversation,
    encode_prompt,
    parse_conversation,
)
from sphinx_model.demo import mistral_tokenizer_path
from sphinx_model.tokenizer import load_tokenizer

from .helpers import CharTokenizer, dialogue

MISTRAL = mistral_tokenizer_path()

ITEM = {"image": "a.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Orange, 日本 😀."}]}


def test_parse_llava_item():
    conv = parse_conversation(ITEM)
    assert conv.images == ["a.jpg"] and conv.system is None
    assert conv.turns == [Turn(USER, "What is this?"), Turn(ASSISTANT, "A cat."),
                          Turn(USER, "And its colour?"), Turn(ASSISTANT, "Orange, 日本 😀.")]
    system = parse_conversation({"conversations": [{"from": "system", "value": " Be brief. "},
                                                   *ITEM["conversations"]]})
    assert system.system == "Be brief." and system.images == []
    numeric = parse_conversation({"conversations": [
        {"from": "user", "value": "2 + 2?"}, {"from": "assistant", "value": 4}]})
    assert numeric.turns[1].text == "4"
    image_only = parse_conversation({"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Two cats."}]})
    assert image_only.turns[0].text == "" and image_only.images == ["a.png", "b.png"]


@pytest.mark.parametrize("item, message", [
    ([1, 2], "must be a JSON object"),
    ({"conversations": []}, "non-empty list"),
    ({"conversations": "hi"}, "non-empty list"),
    ({"image": 3, "conversations": ITEM["conversations"]}, "'image' must be a path"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "from = 'robot'"),
    ({"conversations": [{"from": "gpt", "value": "hi"}]}, "is an assistant turn, expected user"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     "is a user turn, expected assistant"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}]},
     r"conversations\[1\] \(assistant\) is empty"),
    ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
     "is empty"),  # a placeholder without an image
    ({"conversations": [{"from": "human", "value": None}]}, "value must be a string"),
    ({"conversations": [{"from": "human", "value": True}]}, "value must be a string"),
    ({"conversations": ["hi"]}, "must be an object"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "no assistant turn"),
])
def test_invalid_items_say_why(item, message):
    with pytest.raises(InvalidConversation, match=message):
        parse_conversation(item)


def test_template_text_is_the_sphinx_reference_format():
    turns = parse_conversation(ITEM).turns
    assert SPHINX_TEMPLATE.render(turns) == (
        SPHINX_TEMPLATE.system + "\n\n### Human: What is this?\n### Assistant: A cat.\n###"
        " Human: And its colour?\n### Assistant: Orange, 日本 😀.\n###")
    assert SPHINX_TEMPLATE.render(turns[:3], generation=True).endswith(
        "### Human: And its colour?\n### Assistant:")
    assert SPHINX_TEMPLATE.answer_text(" Orange.\n### Human: more") == "Orange."


def test_answer_mask_covers_answers_and_closing_separators():
    tok = CharTokenizer()
    turns = parse_conversation(dialogue(("Q1?", "A one."), ("Q2?", "A two."))).turns
    ids, mask = encode_conversation(tok, turns)
    assert ids[0] == tok.bos_id and len(ids) == len(mask)
    answered = "".join(chr(i) if m else "|" for i, m in zip(ids, mask))
    pieces = [p for p in answered.split("|") if p]
    assert pieces == [" A one.\n###", " A two.\n###"]


@pytest.mark.skipif(MISTRAL is None, reason="mistral-common is not installed")
def test_mistral_tokens_equal_the_whole_text_encoded_and_the_prompt_is_their_prefix():
    tok = load_tokenizer(MISTRAL)
    turns = parse_conversation(ITEM).turns
    ids, mask = encode_conversation(tok, turns)
    assert ids == [tok.bos_id] + tok.encode(SPHINX_TEMPLATE.render(turns))
    answers = [tok.decode([i for i, m in zip(ids, mask) if m])]
    assert answers == ["A cat.\n### Orange, 日本 😀.\n###"]
    for cut in (1, 3):  # a prompt ending with each user turn
        prompt = encode_prompt(tok, turns[:cut])
        assert prompt == ids[:len(prompt)]
        assert tok.decode(prompt).endswith("### Assistant:")
        assert not any(mask[:len(prompt)][-3:])
    system_ids, _ = encode_conversation(tok, turns, system="Be brief.")
    assert tok.decode(system_ids).startswith("Be brief.\n\n### Human:")


def test_prompt_turns_must_alternate_and_end_with_the_user():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="end with a user turn"):
        encode_prompt(tok, [Turn(USER, "a"), Turn(ASSISTANT, "b")])
    with pytest.raises(ValueError, match="alternate"):
        encode_prompt(tok, [Turn(USER, "a"), Turn(USER, "b")])
