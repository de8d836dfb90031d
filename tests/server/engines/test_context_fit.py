"""A prompt too long for the model's context: a code completion at a cursor (the websocket's ``complete``) is
cut to fit, the prefix from its start and the suffix from its end; any other (HTTP, as OpenAI) is refused
with ``context_length_exceeded``."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from transformers import AutoTokenizer

from server.app.main import create_app
from server.config import Settings
from server.engines.base import ContextLengthError, GenerationRequest
from server.engines.decoding import TAIL_STRIDE, encode_prompt, prompt_room
from server.models import DEFAULT_MODEL, ensure_model
from tests.conftest import build_tiny_model

CONTEXT = 512  # the tiny models' max_position_embeddings
CODE = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(300))  # thousands of tokens
CURSOR_LINE = "def target(a, b):\n    return a"


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """The default model's tokenizer (FIM tokens), without the model."""
    return AutoTokenizer.from_pretrained(ensure_model(DEFAULT_MODEL, progress=False))


def test_a_long_fim_prompt_keeps_the_text_nearest_the_cursor(qwen_tokenizer):
    request = GenerationRequest(prompt=CODE + CURSOR_LINE, suffix="\n\n" + CODE, max_tokens=32, heal=True,
                                fit_context=True)
    prompt = encode_prompt(qwen_tokenizer, request, CONTEXT)
    room = prompt_room(request, CONTEXT)
    assert room == CONTEXT - 32
    # Cut to fit, not far below: the prefix's start moves in strides, and line breaks take a few tokens.
    assert room - TAIL_STRIDE - 40 <= len(prompt.ids) <= room
    text = qwen_tokenizer.decode(prompt.ids)
    prefix, _, rest = text.removeprefix("<|fim_prefix|>").partition("<|fim_suffix|>")
    suffix = rest.removesuffix("<|fim_middle|>")
    assert (prefix + prompt.healed).endswith(CURSOR_LINE)  # the cursor keeps its place (less the healed token)
    kept = (prefix + prompt.healed)[: -len(CURSOR_LINE)]
    assert CODE.endswith(kept) and CODE[-len(kept) - 1] == "\n"  # the end of the code, from a line start
    assert suffix.startswith("\n\ndef f0(x):") and suffix.endswith("\n") and CODE.startswith(suffix[2:])
    n_suffix = len(qwen_tokenizer(suffix, add_special_tokens=False)["input_ids"])
    assert room // 4 - 20 <= n_suffix <= room // 4  # the suffix's share; the prefix has the rest


def test_a_short_suffix_leaves_its_share_to_the_prefix(qwen_tokenizer):
    request = GenerationRequest(prompt=CODE + CURSOR_LINE, suffix="\n", max_tokens=16, fit_context=True)
    prompt = encode_prompt(qwen_tokenizer, request, CONTEXT)
    assert prompt_room(request, CONTEXT) - TAIL_STRIDE - 20 <= len(prompt.ids) <= prompt_room(request, CONTEXT)
    assert qwen_tokenizer.decode(prompt.ids).endswith(CURSOR_LINE + "<|fim_suffix|>\n<|fim_middle|>")


def test_a_prompt_that_fits_is_not_cut(qwen_tokenizer):
    request = GenerationRequest(prompt=CURSOR_LINE, suffix="\n", max_tokens=16, heal=True)
    fitted = encode_prompt(qwen_tokenizer, GenerationRequest(**{**request.__dict__, "fit_context": True}), CONTEXT)
    assert fitted == encode_prompt(qwen_tokenizer, request, CONTEXT)


@pytest.mark.parametrize("max_context", [32768, None])  # the default model's context, or one the engine does not know
def test_the_editor_budget_cuts_a_prompt_the_model_could_take(qwen_tokenizer, max_context):
    request = GenerationRequest(prompt=CODE + CURSOR_LINE, suffix="\n\n" + CODE, max_tokens=32, heal=True,
                                fit_context=True, max_prompt_tokens=300)
    assert prompt_room(request, max_context) == 300
    prompt = encode_prompt(qwen_tokenizer, request, max_context)
    assert 300 - 40 <= len(prompt.ids) <= 300
    prefix, _, rest = qwen_tokenizer.decode(prompt.ids).removeprefix("<|fim_prefix|>").partition("<|fim_suffix|>")
    assert (prefix + prompt.healed).endswith(CURSOR_LINE) and rest.startswith("\n\ndef f0(x):")


def test_the_smaller_of_the_budget_and_the_context_decides():
    request = GenerationRequest(prompt="x", max_tokens=32, fit_context=True, max_prompt_tokens=1024)
    assert prompt_room(request, CONTEXT) == CONTEXT - 32
    assert prompt_room(GenerationRequest(prompt="x", max_tokens=32), None) is None


def test_without_fit_context_the_prompt_is_whole(qwen_tokenizer):
    from server.engines.decoding import HEAD_CHARS_PER_TOKEN

    just_past = CODE[: CONTEXT * HEAD_CHARS_PER_TOKEN]  # past the context, but not past the head's size
    prompt = encode_prompt(qwen_tokenizer, GenerationRequest(prompt=just_past), CONTEXT)
    assert len(prompt.ids) > CONTEXT  # the engine refuses it (context_length_exceeded)


def test_a_prompt_that_cannot_fit_is_refused(qwen_tokenizer):
    # A context of 2 tokens: the FIM markers alone take 3.
    request = GenerationRequest(prompt=CODE, suffix=CODE, max_tokens=1, fit_context=True)
    with pytest.raises(ContextLengthError):
        encode_prompt(qwen_tokenizer, request, 2)


@pytest.fixture(scope="module")
def client(tokenizer, tmp_path_factory):
    model = build_tiny_model("llama", len(tokenizer))
    assert model.config.max_position_embeddings == CONTEXT
    app = create_app(Settings(model="tiny", data_dir=tmp_path_factory.mktemp("data")), model=model,
                     tokenizer=tokenizer)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


def test_the_websocket_cuts_a_long_document_and_http_refuses_it(client):
    """A document longer than the model's context completes over the websocket (an editor cannot know the
    model's tokens); the same prompt over HTTP is a 400, as OpenAI answers it."""
    prefix = CODE[-7000:] + CURSOR_LINE  # within the protocol's 8000 characters, past 512 tokens
    with client.websocket_connect("ws://127.0.0.1/v1/ws") as ws:
        ws.send_json({"type": "hello"})
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "complete", "id": "c1", "prefix": prefix, "suffix": "\n" + CODE[:3000],
                      "max_tokens": 4})
        while (reply := ws.receive_json())["type"] in ("completion.delta", "status", "adapted"):
            pass
        assert reply["type"] == "completion.done" and reply["id"] == "c1", reply
    r = client.post("/v1/completions", json={"prompt": prefix, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_the_websocket_keeps_editor_prompt_tokens_of_the_document(tokenizer, tmp_path):
    """--editor-prompt-tokens cuts a websocket completion's prompt below the model's context; HTTP's is whole."""
    app = create_app(Settings(model="tiny", data_dir=tmp_path, editor_prompt_tokens=100),
                     model=build_tiny_model("llama", len(tokenizer)), tokenizer=tokenizer)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        engine = client.app.state.dynarank.engine
        encoded, encode = [], engine.encode
        engine.encode = lambda request: encoded.append(encode(request)) or encoded[-1]
        with client.websocket_connect("ws://127.0.0.1/v1/ws") as ws:
            ws.send_json({"type": "hello"})
            assert ws.receive_json()["type"] == "ready"
            ws.send_json({"type": "complete", "id": "c1", "prefix": CODE[-700:] + CURSOR_LINE, "max_tokens": 4})
            while (reply := ws.receive_json())["type"] != "completion.done":
                assert reply["type"] in ("completion.delta", "status", "adapted"), reply
        r = client.post("/v1/completions", json={"prompt": CODE[-700:] + CURSOR_LINE, "max_tokens": 4})
        assert r.status_code == 200, r.text
    ws_prompt, http_prompt = encoded
    assert 100 - 20 <= len(ws_prompt.ids) <= 100
    assert tokenizer.decode(ws_prompt.ids).endswith(CURSOR_LINE.removesuffix(ws_prompt.healed))
    assert len(http_prompt.ids) > 300  # the same text over HTTP: as sent


def test_the_editor_budget_defaults_by_device_and_reads_from_the_command_line(client):
    from server.cli import build_parser, settings_from_args
    from server.devices import CPU_EDITOR_PROMPT_TOKENS, editor_prompt_budget

    assert client.app.state.dynarank.editor_prompt_tokens == CPU_EDITOR_PROMPT_TOKENS == 1024  # a CPU model
    assert editor_prompt_budget(None, "cpu") == 1024 and editor_prompt_budget(None, "cuda:0") is None
    assert editor_prompt_budget(0, "cpu") is None and editor_prompt_budget(300, "cuda") == 300
    args = build_parser().parse_args(["serve", "--editor-prompt-tokens", "2048"])
    assert settings_from_args(args).editor_prompt_tokens == 2048
    with pytest.raises(ValidationError):
        Settings(editor_prompt_tokens=-1)


def test_without_fim_tokens_the_prefix_has_all_the_room(tokenizer):
    """SmolLM2 has no FIM tokens: its prompt is the prefix alone, so the suffix takes no share."""
    request = GenerationRequest(prompt=CODE + CURSOR_LINE, suffix="\n" + CODE, max_tokens=16, fit_context=True)
    prompt = encode_prompt(tokenizer, request, CONTEXT)
    assert prompt_room(request, CONTEXT) - TAIL_STRIDE - 20 <= len(prompt.ids) <= prompt_room(request, CONTEXT)
    assert tokenizer.decode(prompt.ids).endswith(CURSOR_LINE)


def test_a_prompt_far_past_the_context_is_refused_from_its_head_without_tokenizing_all_of_it(qwen_tokenizer):
    from server.engines.decoding import HEAD_CHARS_PER_TOKEN

    seen = []

    def tokenizer(text, **kwargs):
        seen.append(len(text))
        return qwen_tokenizer(text, **kwargs)

    huge = CODE * 200  # about 6 MB
    with pytest.raises(ContextLengthError, match=f"more than {CONTEXT} tokens"):
        encode_prompt(tokenizer, GenerationRequest(prompt=huge, max_tokens=4), CONTEXT)
    assert seen == [CONTEXT * HEAD_CHARS_PER_TOKEN]  # only the head was tokenized
