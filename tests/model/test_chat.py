"""sphinx-chat: --help, an answer about an image from a tiny SphinxX saved as the trainer saves one
(save_pretrained plus tokenizer.model), streamed and equal to generate's greedy tokens; an
interactive chat keeping the dialogue and the image; a Hugging Face LLM directory (text only); one
error line for a bad path or image; the answer stream never shows the stop text."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from PIL import Image

import sphinx_model as sm
from sphinx_model import chat as chat_cli
from sphinx_model.chat import AnswerStream, main
from sphinx_model.demo import mistral_tokenizer_path

pytestmark = pytest.mark.usefixtures("reference_kernels", "single_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised tiny SphinxX as the trainer leaves it in <output>/final, a photo and
    a file that is not an image."""
    tokenizer = mistral_tokenizer_path()
    if tokenizer is None:
        pytest.skip("mistral-common (the demo extra) is not installed")
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    sm.SphinxX(sm.preset("tiny")).save_pretrained(root / "final")
    shutil.copyfile(tokenizer, root / "final" / "tokenizer.model")
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 90, 3), generator=generator, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(root / "photo.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return root


def run(argv, stdin=""):
    out = io.StringIO()
    return main([str(a) for a in argv], stdin=io.StringIO(stdin), stdout=out), out.getvalue()


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--checkpoint" in out and "--image" in out


def test_module_entry_point_exits_with_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sphinx_model.chat", "--checkpoint",
                           str(tmp_path / "missing"), QUESTION], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"sphinx-chat: error: --checkpoint {tmp_path / 'missing'}: no such " \
                          "directory\n"


def test_answers_a_question_about_an_image(checkpoint):
    code, out = run(["--checkpoint", checkpoint / "final", "--image", checkpoint / "photo.png",
                     "--max-new-tokens", 8, QUESTION])
    assert code == 0
    # The streamed answer is the text of generate's greedy tokens for the trainer's prompt.
    model = sm.SphinxX.from_pretrained(checkpoint / "final")
    tokenizer = sm.load_tokenizer(checkpoint / "final")
    ids = sm.encode_prompt(tokenizer, [sm.Turn("user", QUESTION)])
    image = Image.open(checkpoint / "photo.png")
    tokens = sm.generate(model, [sm.ChatPrompt(ids, [image])], 8, eos_token_id=tokenizer.eos_id,
                         stop_strings=[sm.SPHINX_TEMPLATE.stop_text], tokenizer=tokenizer)[0]
    expected = sm.SPHINX_TEMPLATE.answer_text(tokenizer.decode(tokens))
    assert out == expected + "\n" and expected


def test_interactive_chat_keeps_the_dialogue_and_the_image(checkpoint, monkeypatch):
    prompts = []
    original = chat_cli.stream_generate

    def recording(model, batch, *args, **kwargs):
        prompts.extend(batch)
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(chat_cli, "stream_generate", recording)
    code, out = run(["--checkpoint", checkpoint / "final", "--image", checkpoint / "photo.png",
                     "--max-new-tokens", 4], stdin="Hello?\nAnd then?\n\n")
    assert code == 0 and out.count("Assistant: ") == 2 and len(prompts) == 2
    first, second = prompts
    assert len(first.images) == len(second.images) == 1 and first.images[0] is second.images[0]
    # The second prompt is the first, the answer, and the new question.
    assert second.ids[:len(first.ids)] == first.ids and len(second.ids) > len(first.ids) + 4


def test_checkpoint_kinds(checkpoint, tmp_path):
    assert chat_cli.checkpoint_kind(checkpoint / "final") == "sphinx"
    (tmp_path / "consolidated.00-of-01.model.pth").write_bytes(b"")
    assert chat_cli.checkpoint_kind(tmp_path) == "accessory"


def test_text_only_hugging_face_llm(checkpoint, tmp_path):
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    shutil.copyfile(checkpoint / "final" / "tokenizer.model", tmp_path / "hf" / "tokenizer.model")
    code, out = run(["--checkpoint", tmp_path / "hf", "--max-new-tokens", 3, "Hi"])
    assert code == 0 and out.endswith("\n")
    code, _ = run(["--checkpoint", tmp_path / "hf", "--image", checkpoint / "photo.png", "Hi"])
    assert code == 1


@pytest.mark.parametrize("case", ["missing checkpoint", "not a checkpoint", "missing image",
                                  "corrupt image"])
def test_bad_input_is_one_error_line(case, checkpoint, capsys):
    final = checkpoint / "final"
    argv = {"missing checkpoint": ["--checkpoint", checkpoint / "nowhere", QUESTION],
            "not a checkpoint": ["--checkpoint", checkpoint, QUESTION],
            "missing image": ["--checkpoint", final, "--image", checkpoint / "nope.jpg", QUESTION],
            "corrupt image": ["--checkpoint", final, "--image", checkpoint / "corrupt.png",
                              QUESTION]}[case]
    code, out = run(argv)
    err = capsys.readouterr().err
    assert code == 1 and out == ""
    assert err.startswith("sphinx-chat: error: ") and err.count("\n") == 1, err
    assert ("--image" if "image" in case else "--checkpoint") in err or "config.json" in err


class _CharTokenizer(sm.Tokenizer):
    """One character per id."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("text, shown", [
    (" A cat.\n###", "A cat."),            # the stop text is never written
    (" A\n#b\n###", "A\n#b"),              # a partial stop text that is not one is
    (" x\n#", "x\n#"),                     # at the end (no stop): everything
])
def test_answer_stream_holds_back_the_stop_text(text, shown):
    out = io.StringIO()
    stream = AnswerStream(_CharTokenizer(), "\n###", out)
    written = []
    for ch in text:
        stream.push(ord(ch))
        written.append(out.getvalue())
    answer = stream.finish()
    assert out.getvalue() == shown + "\n" and answer == shown.strip()
    assert all(shown.startswith(w) for w in written)  # never written, then taken back
