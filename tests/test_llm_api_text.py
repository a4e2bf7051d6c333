"""edge_runtime.llm_api's text layer: chat templates (against transformers' apply_chat_template),
incremental detokenization and stop strings (property tests), OpenAI request parsing and response
bodies. No model, no HTTP: tiny tokenizers built here with `tokenizers`."""

import json
from datetime import datetime

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from split.llama.gguf_tokenizer import gpt2_byte_spelling
from edge_runtime.llm_api import (
    SSE_DONE, ApiError, ChatRequest, ChatTemplate, ChatTemplateError, CompletionRequest, IncrementalDetokenizer,
    MessageError, NoChatTemplate, StopStrings, chat_chunk, chat_response, completion_chunk, completion_response,
    new_id, sse, usage, usage_chunk, validate_messages,
)

PROPERTY = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world", "User", ":", ".", "ab", "é", "€", "日本"]


# --- tokenizers ---------------------------------------------------------------------------------
def byte_fallback_bpe() -> Tokenizer:
    """Llama-2 / Mistral style: "▁" for spaces, characters outside the vocabulary as <0xNN> tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    merges = []
    for word in WORDS:
        pieces = ["▁"] + list(word)
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        while len(pieces) > 1:  # merge left to right: ▁t, ▁th, ▁the
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tok


def byte_level_bpe() -> Tokenizer:
    """GPT-2 / Llama-3 / Qwen style: every byte a character, merges over them."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    byte_char = {b: c for b, c in zip(range(256), gpt2_byte_spelling())}
    merges = []
    for word in WORDS:
        pieces = [byte_char[b] for b in (" " + word).encode()]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in
                            ("<|begin_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>")])
    return tok


def word_level() -> Tokenizer:
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("[EOS]", special=True)])
    return tok


TOKENIZERS = {"byte_fallback": byte_fallback_bpe(), "byte_level": byte_level_bpe(), "word_level": word_level()}


def stream(tok, ids, prompt_ids=(), skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    return [detok.push(t) for t in ids] + [detok.flush()]


# --- incremental detokenization -----------------------------------------------------------------
@pytest.mark.parametrize("name", TOKENIZERS)
@PROPERTY
@given(data=st.data(), skip=st.booleans())
def test_detokenizer_pieces_concatenate_to_decode_of_random_ids(name, data, skip):
    tok = TOKENIZERS[name]
    ids = data.draw(st.lists(st.integers(0, tok.get_vocab_size() - 1), max_size=40))
    assert "".join(stream(tok, ids, skip_special_tokens=skip)) == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("name", ["byte_fallback", "byte_level"])
@PROPERTY
@given(text=st.text(alphabet=st.sampled_from(list(" abcehlmnorstuUw:.é€日本😀\n")), max_size=30))
def test_detokenizer_streams_encoded_text_without_replacement_characters(name, text):
    tok = TOKENIZERS[name]
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("name", TOKENIZERS)
@PROPERTY
@given(data=st.data())
def test_detokenizer_reads_generated_ids_in_the_context_of_the_prompt(name, data):
    tok = TOKENIZERS[name]
    words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)
    prompt = tok.encode(data.draw(words), add_special_tokens=False).ids
    ids = data.draw(st.lists(st.integers(0, tok.get_vocab_size() - 1), max_size=30))
    before, whole = tok.decode(prompt), tok.decode(prompt + ids)
    assume(whole.startswith(before))
    assert "".join(stream(tok, ids, prompt)) == whole[len(before):]


def test_detokenizer_holds_a_character_until_its_bytes_are_complete():
    tok = TOKENIZERS["byte_level"]
    euro = [tok.token_to_id(c) for c in ("â", "Ĥ", "¬")]  # "€" = E2 82 AC as byte-level characters
    assert stream(tok, euro) == ["", "", "€", ""]
    assert stream(tok, euro[:2]) == ["", "", "\ufffd"]  # incomplete at the very end: only in flush()

    tok = TOKENIZERS["byte_fallback"]
    euro = [tok.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    cat = tok.token_to_id("▁cat")
    assert stream(tok, euro + [cat]) == ["", "", "", "€ cat", ""]  # a byte run is final once a token ends it
    assert stream(tok, euro) == ["", "", "", "€"]
    invalid = euro + [tok.token_to_id("<0xFF>")]  # tokenizers makes the whole run U+FFFD, byte by byte
    assert "".join(stream(tok, invalid)) == tok.decode(invalid) == "\ufffd" * 4


def test_detokenizer_keeps_the_leading_space_a_prompt_gives_the_first_token():
    tok = TOKENIZERS["byte_fallback"]
    prompt = tok.encode("hello").ids
    world = tok.token_to_id("▁world")
    assert stream(tok, [world]) == ["world", ""]
    assert stream(tok, [world], prompt) == [" world", ""]
    assert stream(tok, [world, 2], prompt) == [" world", "", ""]  # </s> skipped
    assert "".join(stream(tok, [world, 2], prompt, skip_special_tokens=False)) == " world</s>"


# --- stop strings -------------------------------------------------------------------------------
def run_stops(stops, chunks) -> tuple[str, bool]:
    s, out = StopStrings(stops), []
    for chunk in chunks:
        text, stopped = s.feed(chunk)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + s.finish(), False


@PROPERTY
@given(text=st.text(alphabet="ab\n", max_size=30),
       stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_stop_strings_cut_before_the_first_stop_for_any_chunking(text, stops, cuts):
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert run_stops(stops, chunks) == ((text[:min(found)], True) if found else (text, False))


def test_stop_strings_hold_back_only_what_could_still_become_a_stop():
    s = StopStrings(["User:", "\n\n"])
    assert s.feed("Hello Us") == ("Hello ", False)
    assert s.feed("ually\n") == ("Usually", False)
    assert s.feed("\nmore") == ("", True)
    assert s.feed("after") == ("", True)
    s = StopStrings(["</s>"])
    assert s.feed("a <") == ("a ", False) and s.finish() == "<"
    assert StopStrings([]).feed("anything") == ("anything", False)
    with pytest.raises(ValueError):
        StopStrings([""])


def test_detokenizer_and_stop_strings_together():
    tok = TOKENIZERS["byte_fallback"]
    ids = tok.encode("hello world . User : the cat").ids
    stops, out = StopStrings(["User"]), []
    detok = IncrementalDetokenizer(tok)
    for t in ids:
        text, stopped = stops.feed(detok.push(t))
        out.append(text)
        if stopped:
            break
    assert stopped and "".join(out) == "hello world . "


# --- chat templates -----------------------------------------------------------------------------
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
TOOLS = (  # namespace, loop controls, tojson, strftime_now, a {% generation %} block, a keyword variable
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{{ m | tojson }}\n{% endfor %}{{ ns.n }} {{ strftime_now('%Y') }} "
    "{% generation %}{{ greeting | default('none') }}{% endgeneration %}{{ tools is none }}")

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Hi <b>&</b> é 日本 "},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


def write_folder(path, template, jinja_file=False, tokenizer=True):
    path.mkdir(parents=True, exist_ok=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}}
    if jinja_file:
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if tokenizer:
        TOKENIZERS["byte_level"].save(str(path / "tokenizer.json"))
    return path


RENDER_CASES = {"llama3": (LLAMA3, CHAT), "chatml": (CHATML, CHAT), "chatml_no_system": (CHATML, CHAT[1:]),
                "zephyr": (ZEPHYR, CHAT), "mistral": (MISTRAL, CHAT[1:]), "tools": (TOOLS, CHAT)}


@pytest.mark.parametrize("name", RENDER_CASES)
@pytest.mark.parametrize("jinja_file", [False, True])
def test_chat_template_renders_as_transformers_apply_chat_template(tmp_path, name, jinja_file):
    from transformers import PreTrainedTokenizerFast
    template, messages = RENDER_CASES[name]
    folder = write_folder(tmp_path / name, template, jinja_file)
    ours = ChatTemplate.from_dir(folder)
    hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    for add in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours.render(messages, add_generation_prompt=add) == expected
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, greeting="hej")
    assert ours.render(messages, greeting="hej") == expected


def test_chat_template_rendered_examples():
    llama3 = ChatTemplate(LLAMA3, {"bos_token": "<|begin_of_text|>"})
    assert llama3.render([{"role": "user", "content": " Hi "}]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    out = ChatTemplate(TOOLS).render(CHAT)
    assert '"content": "  Hi <b>&</b> é 日本 "' in out  # tojson: no HTML escaping, no \\u escapes
    assert out.endswith(f"3 {datetime.now():%Y} noneTrue")
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert ChatTemplate(CHATML).render(parts).endswith("<|im_start|>user\none\ntwo<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_from_a_list_of_named_templates_and_the_jinja_file_first(tmp_path):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT {{ eos_token }}"}]
    assert ChatTemplate.from_dir(write_folder(tmp_path / "a", named)).render(CHAT) == "DEFAULT <|eot_id|>"
    folder = write_folder(tmp_path / "b", "FILE", jinja_file=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "CONFIG"}))
    assert ChatTemplate.from_dir(folder).render(CHAT) == "FILE"


@pytest.mark.parametrize("template", [None, "", [{"name": "tool_use", "template": "x"}]])
def test_a_model_without_a_chat_template(tmp_path, template):
    folder = write_folder(tmp_path, template, tokenizer=False)
    with pytest.raises(NoChatTemplate, match="use /v1/completions"):
        ChatTemplate.from_dir(folder)
    with pytest.raises(NoChatTemplate):
        ChatTemplate.from_dir(tmp_path / "missing")


@pytest.mark.parametrize("template, messages, match", [
    (MISTRAL, CHAT[1:2] * 2, "roles must alternate"),                      # its own raise_exception
    (MISTRAL, [CHAT[1], CHAT[0]], "Only user and assistant"),
    ("{{ messages[0].nothing.deeper }}", CHAT, "has no attribute 'nothing'"),  # an undefined variable, used
    ("{% set x = messages.append(1) %}", CHAT, "unsafe"),                  # sandbox: no mutation
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", CHAT, "unsafe"),     # sandbox: no dunders
    ("{{ messages[0].content + 1 }}", CHAT, "TypeError"),                   # any other failure inside
    ("{{ messages[9].content }}", CHAT, "has no element 9"),
])
def test_chat_template_errors_are_clear(template, messages, match):
    with pytest.raises(ChatTemplateError, match=f"(?i){match}"):
        ChatTemplate(template).render(messages)


def test_a_chat_template_that_does_not_compile():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


@pytest.mark.parametrize("messages, param", [
    ([], "messages"), ("hi", "messages"), (None, "messages"), (["hi"], "messages[0]"),
    ([{"content": "x"}], "messages[0].role"), ([{"role": 1, "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"), ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": ["x"]}], "messages[0].content[0]"),
    ([CHAT[0], {"role": "user", "content": [{"type": "text", "text": "a"},
                                            {"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[1].content[1].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
])
def test_bad_messages_name_where(messages, param):
    with pytest.raises(MessageError) as err:
        validate_messages(messages)
    assert err.value.param == param


def test_messages_are_normalized_copies():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}], "name": "bob", "tool_calls": None}]
    assert validate_messages(msgs) == [{"role": "user", "content": "a", "name": "bob"}]
    assert msgs[0]["content"] == [{"type": "text", "text": "a"}]


# --- requests -----------------------------------------------------------------------------------
def test_chat_request_defaults_and_fields():
    req = ChatRequest.parse({"model": "m", "messages": CHAT, "unknown_field": {"ignored": True}})
    assert (req.model, req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, req.stream,
            req.include_usage) == ("m", None, 1.0, 1.0, None, (), False, False)
    assert req.messages == tuple(validate_messages(CHAT))
    req = ChatRequest.parse({"messages": CHAT, "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0,
                             "top_p": 0.5, "seed": 3, "stop": "\n", "n": 1, "stream": True,
                             "stream_options": {"include_usage": True}, "presence_penalty": 0,
                             "frequency_penalty": 0.0, "logprobs": False, "top_k": 40, "repetition_penalty": 1.1,
                             "chat_template_kwargs": {"enable_thinking": False}})
    assert (req.model, req.max_tokens, req.stop, req.stream, req.include_usage) == (None, 7, ("\n",), True, True)
    assert req.chat_template_kwargs == {"enable_thinking": False}
    assert req.sampling_kwargs() == {"temperature": 0.0, "top_k": 40, "top_p": 0.5, "seed": 3,
                                     "repetition_penalty": 1.1}


def test_sampling_kwargs_build_split_llama_sampling():
    from split.llama import Sampling
    greedy = Sampling(**ChatRequest.parse({"messages": CHAT, "temperature": 0, "top_k": -1}).sampling_kwargs())
    assert greedy.greedy and greedy.top_k == 0
    hot = Sampling(**CompletionRequest.parse({"prompt": "x", "temperature": 2, "seed": -1}).sampling_kwargs())
    assert not hot.greedy and hot.seed == -1 and hot.generator() is not None


@pytest.mark.parametrize("prompt, parsed", [
    ("hello", "hello"), (["hello"], "hello"), ([1, 2, 3], (1, 2, 3)), ([[4, 5]], (4, 5)), ("", "")])
def test_completion_request_prompts(prompt, parsed):
    req = CompletionRequest.parse({"model": "m", "prompt": prompt, "max_tokens": 16, "stop": ["a", "b"]})
    assert (req.prompt, req.max_tokens, req.stop) == (parsed, 16, ("a", "b"))


CHAT_BODY = {"model": "m", "messages": CHAT}


@pytest.mark.parametrize("change, param, code", [
    ({"model": 3}, "model", "invalid_type"),
    ({"messages": None}, "messages", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type",
     "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"), ({"max_tokens": "5"}, "max_tokens", "invalid_type"),
    ({"max_tokens": 2.0}, "max_tokens", "invalid_type"), ({"max_tokens": True}, "max_tokens", "invalid_type"),
    ({"max_completion_tokens": -1}, "max_completion_tokens", "invalid_value"),
    ({"temperature": 2.5}, "temperature", "invalid_value"), ({"temperature": -0.1}, "temperature", "invalid_value"),
    ({"temperature": "hot"}, "temperature", "invalid_type"), ({"temperature": True}, "temperature", "invalid_type"),
    ({"top_p": 0}, "top_p", "invalid_value"), ({"top_p": 1.01}, "top_p", "invalid_value"),
    ({"seed": 1.5}, "seed", "invalid_type"), ({"seed": 2**64}, "seed", "invalid_value"),
    ({"stop": 5}, "stop", "invalid_type"), ({"stop": ["a", 1]}, "stop", "invalid_type"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"), ({"stop": ""}, "stop", "invalid_value"),
    ({"n": 2}, "n", "unsupported_value"), ({"n": 0}, "n", "invalid_value"),
    ({"stream": "yes"}, "stream", "invalid_type"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),  # without stream
    ({"stream": True, "stream_options": []}, "stream_options", "invalid_type"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "invalid_type"),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_value"),
    ({"frequency_penalty": -1}, "frequency_penalty", "unsupported_value"),
    ({"frequency_penalty": 3}, "frequency_penalty", "invalid_value"),
    ({"logprobs": True}, "logprobs", "unsupported_value"), ({"top_logprobs": 2}, "top_logprobs", "unsupported_value"),
    ({"top_k": -2}, "top_k", "invalid_value"), ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
    ({"chat_template_kwargs": "x"}, "chat_template_kwargs", "invalid_type"),
])
def test_bad_chat_requests_are_400s_naming_the_param(change, param, code):
    with pytest.raises(ApiError) as err:
        ChatRequest.parse({**CHAT_BODY, **change})
    e = err.value
    assert (e.status, e.param, e.code, e.type) == (400, param, code, "invalid_request_error")
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param,
                                  "code": code}}
    assert param.split("[")[0].split(".")[0] in e.message


@pytest.mark.parametrize("body, param, code", [
    ({"model": "m"}, "prompt", "missing_required_parameter"),
    ({"prompt": ["a", "b"]}, "prompt", "unsupported_value"), ({"prompt": [[1], [2]]}, "prompt", "unsupported_value"),
    ({"prompt": []}, "prompt", "invalid_type"), ({"prompt": [1, "a"]}, "prompt", "invalid_type"),
    ({"prompt": [1, -2]}, "prompt", "invalid_value"), ({"prompt": [True]}, "prompt", "invalid_type"),
    ({"prompt": 7}, "prompt", "invalid_type"), ({"prompt": "x", "echo": True}, "echo", "unsupported_value"),
    ({"prompt": "x", "best_of": 3}, "best_of", "unsupported_value"),
    ({"prompt": "x", "logprobs": 2}, "logprobs", "unsupported_value"),
])
def test_bad_completion_requests_are_400s_naming_the_param(body, param, code):
    with pytest.raises(ApiError) as err:
        CompletionRequest.parse(body)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code)


def test_missing_messages_and_a_body_that_is_not_an_object():
    with pytest.raises(ApiError) as err:
        ChatRequest.parse({"model": "m"})
    assert (err.value.param, err.value.code) == ("messages", "missing_required_parameter")
    with pytest.raises(ApiError) as err:
        CompletionRequest.parse([1, 2])
    assert err.value.status == 400 and err.value.param is None


# --- responses ----------------------------------------------------------------------------------
def test_response_bodies_have_openai_field_names():
    u = usage(12, 3)
    assert u == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    cid = new_id("chatcmpl")
    assert cid.startswith("chatcmpl-") and cid != new_id("chatcmpl")
    assert chat_chunk(cid, "m", 7, {"role": "assistant", "content": ""}) == {
        "id": cid, "object": "chat.completion.chunk", "created": 7, "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]}
    last = chat_chunk(cid, "m", 7, {}, "stop", include_usage=True)
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"] is None
    assert usage_chunk(cid, "m", 7, "chat.completion.chunk", u) == {
        "id": cid, "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": [], "usage": u}
    assert chat_response(cid, "m", 7, "Hello", "length", u, edge_tokens=2) == {
        "id": cid, "object": "chat.completion", "created": 7, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
                     "finish_reason": "length"}], "usage": u, "edge_tokens": 2}
    assert completion_chunk("cmpl-1", "m", 7, "He") == {
        "id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
        "choices": [{"index": 0, "text": "He", "logprobs": None, "finish_reason": None}]}
    assert completion_response("cmpl-1", "m", 7, "Hello", "stop", u) == {
        "id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
        "choices": [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "stop"}], "usage": u}
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n' and SSE_DONE == "data: [DONE]\n\n"


def test_response_bodies_validate_as_the_openai_client_types():
    types = pytest.importorskip("openai.types")
    chat = pytest.importorskip("openai.types.chat")
    u = usage(4, 2)
    chat.ChatCompletionChunk.model_validate(chat_chunk("c", "m", 1, {"role": "assistant", "content": ""}, None, True))
    chat.ChatCompletionChunk.model_validate(usage_chunk("c", "m", 1, "chat.completion.chunk", u))
    chat.ChatCompletion.model_validate(chat_response("c", "m", 1, "hi", "stop", u))
    types.Completion.model_validate(completion_chunk("c", "m", 1, "hi", "length"))
    types.Completion.model_validate(completion_response("c", "m", 1, "hi", "stop", u))
