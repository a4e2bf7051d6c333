"""The agent's OpenAI-compatible HTTP endpoint (issue 13), with the official `openai` client against
a real `edge-runtime agent` process on loopback.

    .venv/bin/python -m pytest -q tests/test_llm_http.py

One agent serves two `llm` pipelines over a tiny random-initialised Llama written by transformers
with a WordLevel tokenizer.json (clean text: "t5 t9") and a ChatML chat template:
  tiny    its EOS id is the fourth greedy token after EOS_PROMPT, so that prompt ends at EOS
  plain   the same weights without a chat template and without EOS ids; max_queue = 1
and a `collab-llm` pipeline (standalone: every token decided on the device), `collab`.
Its [serve] token_file guards both the HTTP and the gRPC port. References come from the
single-process path (split.llama.generate over load_llama(folder)), greedy.
"""
import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hf_random import randomize_norms_and_biases  # noqa: E402
from server_process import AgentProcess  # noqa: E402

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

from edge_runtime.client.oip_client import OipClient, build_request  # noqa: E402
from split.llama import Stop, generate, load_llama  # noqa: E402

TOKEN = "t0ps3cret"
CONTEXT = 4096
WORDS = {"<|im_start|>": 120, "<|im_end|>": 121, "user": 122, "assistant": 123, "system": 124}
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
EOS_PROMPT = [3, 17, 42, 5, 99, 7]
LONG = 4000                   # tokens of the generations that must still run while the test acts


def words(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def _write_tokenizer(folder, chat_template: str | None) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(120)} | WORDS
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None}
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _set_eos(folder, eos) -> None:
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        data = json.loads(path.read_text())
        data["eos_token_id"] = eos
        path.write_text(json.dumps(data))


class Model:
    """The checkpoint and what the single-process path generates from it."""

    def __init__(self, folder, tokenizer, eos: int):
        self.folder, self.tokenizer, self.eos = folder, tokenizer, eos
        self.llama = load_llama(folder)

    def tokens(self, ids, n: int, eos: bool = True) -> list[int]:
        with torch.no_grad():
            return list(generate(self.llama, ids, n, stop=Stop((self.eos,) if eos else ())))

    def text(self, prompt_ids, tokens, eos: bool = True) -> str:
        """What the API streams for these tokens: their text in the prompt's context, EOS not shown
        (eos=False: a pipeline without EOS ids, "plain")."""
        shown = [t for t in tokens if t != self.eos or not eos]
        full, head = self.tokenizer.decode(list(prompt_ids) + shown), self.tokenizer.decode(list(prompt_ids))
        assert full.startswith(head)
        return full[len(head):]

    def chat_ids(self, messages) -> list[int]:
        """The rendered ChatML prompt's token ids, written out here by hand."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return self.tokenizer.encode(text + "<|im_start|>assistant\n", add_special_tokens=False).ids


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tokenizers import Tokenizer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                   mlp_bias=True, max_position_embeddings=CONTEXT, initializer_range=0.2,
                                   eos_token_id=121)
    hf = randomize_norms_and_biases(transformers.LlamaForCausalLM(cfg).eval())
    root = tmp_path_factory.mktemp("llm_http")
    tiny, plain = root / "tiny", root / "plain"
    hf.save_pretrained(tiny, safe_serialization=True)
    _write_tokenizer(tiny, CHATML)
    _set_eos(tiny, None)
    with torch.no_grad():
        greedy = list(generate(load_llama(tiny), EOS_PROMPT, 4))
    eos = greedy[3]
    assert eos not in greedy[:3], greedy
    _set_eos(tiny, eos)
    shutil.copytree(tiny, plain)
    _write_tokenizer(plain, None)
    _set_eos(plain, None)
    return Model(tiny, Tokenizer.from_file(str(tiny / "tokenizer.json")), eos)


@pytest.fixture(scope="module")
def collab_model(tmp_path_factory):
    """(folder, tokenizer) of the collaborative LLM of tests/llm_models.py, with a tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llm_models import make_model
    folder = tmp_path_factory.mktemp("collab") / "lm"
    make_model(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder, tok


class Agent:
    def __init__(self, proc: AgentProcess):
        self.proc = proc
        line = proc.wait_for("serving http://")
        self.http = line.split("serving ")[1].split()[0]           # http://127.0.0.1:PORT/v1
        self.client = openai.OpenAI(base_url=self.http, api_key=TOKEN, max_retries=0, timeout=120)

    def wait_models(self, n: int) -> None:
        """Until n pipelines are open (before: 503 for them)."""
        deadline = time.monotonic() + 120
        while len(self.client.models.list().data) < n:
            assert time.monotonic() < deadline and self.proc.proc.poll() is None, self.proc.output()
            time.sleep(0.05)

    def stopped(self) -> int:
        """The agent's exit status, once it has exited."""
        return self.proc.proc.wait(60)

    def get(self, path: str, token: str | None = TOKEN, body: bytes | None = None):
        """(status, headers, body) of a raw request to the HTTP port."""
        request = urllib.request.Request(self.http.removesuffix("/v1") + path, data=body,
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    def metrics(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families
        status, _, body = self.get("/metrics")
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body.decode()) for s in family.samples}

    def metric(self, name: str, **labels) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tp-cache")


@pytest.fixture(scope="module")
def agent(model, collab_model, cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_http_agent")
    (root / "token").write_text(TOKEN + "\n")
    (root / "agent.toml").write_text(
        f'device_id = "llm-box"\nstate_dir = "state"\n[serve]\nhost = "127.0.0.1"\nport = 0\nhttp_port = 0\n'
        f'token_file = "token"\n'
        f'[[pipeline]]\nname = "tiny"\nkind = "llm"\npath = "{model.folder}"\ncache_dir = "{cache}"\n'
        f'[[pipeline]]\nname = "plain"\nkind = "llm"\npath = "{model.folder.parent / "plain"}"\n'
        f'cache_dir = "{cache}"\nmax_queue = 1\n'
        f'[[pipeline]]\nname = "collab"\nkind = "collab-llm"\npath = "{collab_model[0]}"\nmode = "standalone"\n')
    proc = AgentProcess(root / "agent.toml", "--grace-s", "60")
    try:
        a = Agent(proc)
        a.wait_models(3)
        yield a
    finally:
        proc.kill()


def stream_chat(agent, **kw):
    """(first delta's role, the text, finish_reason, usage, last chunk) of a streamed chat."""
    chunks = list(agent.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and not chunks[-1].choices, "one last chunk, then the usage chunk"
    return text, finals[0].choices[0].finish_reason, chunks[-1].usage, len(chunks)


# --- answers equal the single-process path ------------------------------------------------------
def test_models_lists_the_llm_pipelines(agent):
    models = agent.client.models.list().data
    assert sorted(m.id for m in models) == ["collab", "plain", "tiny"] and {m.owned_by for m in models} == {"edgefold"}
    assert agent.client.models.retrieve("tiny").id == "tiny"


def test_chat_streamed_and_whole_equal_the_pipelines_greedy_tokens(agent, model):
    messages = [{"role": "system", "content": "t1 t2"}, {"role": "user", "content": "t5 t9 t33"}]
    ids = model.chat_ids(messages)
    ref = model.tokens(ids, 10)
    expected = model.text(ids, ref)
    finish = "stop" if ref[-1] == model.eos else "length"
    text, reason, use, n_chunks = stream_chat(agent, model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert (text, reason) == (expected, finish) and expected
    assert (use.prompt_tokens, use.completion_tokens, use.total_tokens) == (len(ids), len(ref), len(ids) + len(ref))
    assert n_chunks >= 3
    whole = agent.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == finish and whole.object == "chat.completion"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), len(ref))
    assert getattr(whole, "edgefold", None) is None            # only collab-llm reports device tokens


def test_completions_of_text_and_of_token_ids(agent, model):
    prompt = [11, 22, 33, 44]
    ref = model.tokens(prompt, 12)
    expected = model.text(prompt, ref)
    for sent in (prompt, words(prompt)):                       # token ids, or text through the tokenizer
        chunks = list(agent.client.completions.create(model="tiny", prompt=sent, max_tokens=12, temperature=0,
                                                      stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == ("stop" if model.eos in ref else "length")
        whole = agent.client.completions.create(model="tiny", prompt=sent, max_tokens=12, temperature=0)
        assert whole.choices[0].text == expected
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (4, len(ref))


def test_eos_ends_with_stop_and_max_tokens_with_length(agent, model):
    ref = model.tokens(EOS_PROMPT, 20)
    assert len(ref) == 4 and ref[-1] == model.eos
    out = agent.client.completions.create(model="tiny", prompt=EOS_PROMPT, max_tokens=20, temperature=0)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == model.text(EOS_PROMPT, ref)
    assert out.usage.completion_tokens == 4                    # the EOS counts, but is not shown
    out = agent.client.completions.create(model="tiny", prompt=EOS_PROMPT, max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.choices[0].text == model.text(EOS_PROMPT, ref[:2])
    assert out.usage.completion_tokens == 2
    # without max_tokens: what is left of the context (no EOS in "plain": it runs to the end)
    prompt = [1 + i % 119 for i in range(CONTEXT - 6)]
    out = agent.client.completions.create(model="plain", prompt=prompt, temperature=0)
    ref = model.tokens(prompt, 6, eos=False)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    assert out.choices[0].text == model.text(prompt, ref, eos=False)


def test_stop_strings_end_the_text_before_them(agent, model):
    prompt = [8, 16, 32, 64]
    ref = model.tokens(prompt, 16, eos=False)
    full = model.text(prompt, ref, eos=False)
    stop = f" t{ref[5]}"
    cut = full.find(stop)
    used = next(i + 1 for i in range(len(ref)) if stop in model.text(prompt, ref[:i + 1], eos=False))
    for stream in (True, False):
        kw = dict(model="plain", prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "never said"])
        if stream:
            chunks = list(agent.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reason, use = chunks[-2].choices[0].finish_reason, chunks[-1].usage
        else:
            out = agent.client.completions.create(**kw)
            text, reason, use = out.choices[0].text, out.choices[0].finish_reason, out.usage
        assert (text, reason, use.completion_tokens) == (full[:cut], "stop", used)
    out = agent.client.completions.create(model="plain", prompt=prompt, max_tokens=16, temperature=0, stop="t999")
    assert (out.choices[0].text, out.choices[0].finish_reason) == (full, "length")


def test_two_concurrent_streams_both_complete(agent, model):
    prompts = [[9, 8, 7], [1, 2, 3, 4, 5]]
    refs = [model.tokens(p, 40) for p in prompts]
    got, errors = {}, []

    def run(i):
        try:
            chunks = agent.client.completions.create(model="tiny", prompt=prompts[i], max_tokens=40, temperature=0,
                                                     stream=True)
            got[i] = "".join(c.choices[0].text for c in chunks)
        except Exception as err:        # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == {i: model.text(prompts[i], refs[i]) for i in range(2)}


def test_collab_llm_reports_the_tokens_decided_on_the_device(agent, collab_model):
    from edge_runtime.collab.device import CollabLlm
    from split.llama import LlamaConfig
    folder, tok = collab_model
    prompt = [5, 17, 3, 42, 8, 11]
    ref = CollabLlm(folder, "standalone").generate(prompt, 6).tokens
    eos = LlamaConfig.from_dir(folder).eos_token_ids
    ref = ref[:next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
    shown = [t for t in ref if t not in eos]
    expected = tok.decode(prompt + shown)[len(tok.decode(prompt)):]
    chunks = list(agent.client.completions.create(model="collab", prompt=prompt, max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason and chunks[-1].edgefold == {"device_tokens": len(ref)}
    whole = agent.client.completions.create(model="collab", prompt=words(prompt), max_tokens=6)
    assert whole.choices[0].text == expected and whole.edgefold == {"device_tokens": len(ref)}
    assert whole.usage.completion_tokens == len(ref)


def test_seeded_sampling_repeats(agent):
    kw = dict(model="tiny", prompt=[5, 6, 7], max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    first, again = (agent.client.completions.create(**kw).choices[0].text for _ in range(2))
    assert first == again


# --- errors ------------------------------------------------------------------------------------------
def test_bad_requests_get_400_naming_the_field(agent, model):
    c = agent.client
    for kw, param in ((dict(temperature=5), "temperature"), (dict(n=2), "n"), (dict(max_tokens=0), "max_tokens"),
                      (dict(stop=[""]), "stop")):
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model="tiny", prompt="t1", **kw)
        assert err.value.param == param and err.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="tiny", messages=[{"role": "user"}])
    assert err.value.param == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as err:               # a model without a chat template
        c.chat.completions.create(model="plain", messages=[{"role": "user", "content": "t1"}])
    assert "no chat template" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:               # larger than the context: both lengths
        c.completions.create(model="tiny", prompt=list(range(1, 101)) * 40, max_tokens=200)
    assert f"context is {CONTEXT} tokens" in err.value.message and "4000 in the prompt, 200 to generate" in \
        err.value.message and err.value.code == "context_length_exceeded"
    status, _, body = agent.get("/v1/completions", body=b"{not json")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_unknown_model_and_path_get_404(agent):
    with pytest.raises(openai.NotFoundError) as err:
        agent.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "t1"}])
    assert err.value.code == "model_not_found" and err.value.param == "model" and "tiny" in err.value.message
    status, _, body = agent.get("/v1/nothing")
    assert status == 404 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    status, _, body = agent.get("/v1/completions", body=json.dumps({"prompt": "t1"}).encode())
    assert status == 400 and json.loads(body)["error"]["param"] == "model"     # three models: name one
    status, headers, body = agent.get("/v1/chat/completions")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


def test_the_token_guards_both_ports(agent, model):
    refused = agent.metric("edgefold_llm_requests_total", pipeline="", status="401")
    wrong = openai.OpenAI(base_url=agent.http, api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.completions.create(model="tiny", prompt="t1", max_tokens=1)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    status, headers, body = agent.get("/v1/models", token=None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and json.loads(body)["error"]["message"]
    assert agent.metric("edgefold_llm_requests_total", pipeline="", status="401") == refused + 2
    assert agent.get("/metrics", token=None)[0] == 401 and agent.get("/health", token=None)[0] == 200
    prompt = np.array(EOS_PROMPT, np.int64)
    request = build_request("tiny", {"prompt_ids": prompt}, parameters={"max_new_tokens": 3})
    for token in (None, "guess"):
        with OipClient(agent.proc.address, token=token) as client:
            with pytest.raises(grpc.RpcError) as rpc:
                client.infer("tiny", {"prompt_ids": prompt}, parameters={"max_new_tokens": 3})
            assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as rpc:                 # the streaming RPC too
                list(client.stream(iter([request, request])))
            assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with OipClient(agent.proc.address, token=TOKEN) as client:
        out = client.infer("tiny", {"prompt_ids": prompt}, parameters={"max_new_tokens": 3})
    assert out["tokens"].tolist() == model.tokens(EOS_PROMPT, 3)


# --- serving: the queue, disconnects, shutdown ----------------------------------------------------------
def test_a_full_queue_gets_429_and_a_disconnect_stops_the_generation(agent, model):
    before = agent.metric("edgefold_llm_generated_tokens_total", pipeline="plain")
    long = agent.client.completions.create(model="plain", prompt=[1, 2, 3], max_tokens=LONG, temperature=0,
                                           stream=True)
    first = next(iter(long))
    assert first.choices[0].finish_reason is None                 # running, and holding plain's one slot
    with pytest.raises(openai.RateLimitError) as err:
        agent.client.completions.create(model="plain", prompt=[1, 2, 3], max_tokens=1)
    assert err.value.response.headers["retry-after"] == "1" and err.value.code == "rate_limit_exceeded"
    long.close()                                                   # the client goes away mid-stream
    deadline = time.monotonic() + 60
    while agent.metric("edgefold_llm_requests_total", pipeline="plain", status="499") < 1:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.02)
    out = agent.client.completions.create(model="plain", prompt=[1, 2, 3], max_tokens=5, temperature=0)
    assert out.choices[0].text == model.text([1, 2, 3], model.tokens([1, 2, 3], 5, eos=False), eos=False)
    generated = agent.metric("edgefold_llm_generated_tokens_total", pipeline="plain") - before
    assert 1 <= generated - 5 < LONG, "the abandoned generation ran on"
    assert agent.metric("edgefold_llm_queue_depth", pipeline="plain") == 0
    assert agent.metric("edgefold_llm_time_to_first_token_seconds_count", pipeline="plain") >= 2


def test_a_client_gone_before_a_whole_answer_stops_its_generation(agent):
    """Not streamed: the client sends its request and goes away while the answer is computed."""
    gone = agent.metric("edgefold_llm_requests_total", pipeline="plain", status="499")
    before = agent.metric("edgefold_llm_generated_tokens_total", pipeline="plain")
    body = json.dumps({"model": "plain", "prompt": [1, 2, 3], "max_tokens": LONG, "temperature": 0}).encode()
    port = int(agent.http.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 60
        while agent.metric("edgefold_llm_generated_tokens_total", pipeline="plain") == before:
            assert time.monotonic() < deadline, "the request did not start"
            time.sleep(0.02)
    deadline = time.monotonic() + 60
    while agent.metric("edgefold_llm_requests_total", pipeline="plain", status="499") == gone:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.02)
    assert agent.client.completions.create(model="plain", prompt=[1], max_tokens=2).usage.completion_tokens == 2
    assert agent.metric("edgefold_llm_generated_tokens_total", pipeline="plain") - before - 2 < LONG


def test_sigterm_lets_a_stream_in_flight_finish(agent, model):
    n = 1000
    stream = agent.client.completions.create(model="plain", prompt=[4, 5, 6], max_tokens=n, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    chunks = iter(stream)
    got = [next(chunks)]
    agent.proc.proc.send_signal(signal.SIGTERM)
    got += list(chunks)
    assert got[-2].choices[0].finish_reason == "length" and got[-1].usage.completion_tokens == n
    ref = model.tokens([4, 5, 6], n, eos=False)
    assert "".join(c.choices[0].text for c in got if c.choices) == model.text([4, 5, 6], ref, eos=False)
    assert agent.stopped() == 0, agent.proc.output()
    assert "1 request(s) in flight" in agent.proc.output() and "agent stopped" in agent.proc.output()


def test_a_stream_still_running_at_the_grace_deadline_is_closed(model, cache, tmp_path):
    (tmp_path / "agent.toml").write_text(
        f'device_id = "d"\n[serve]\nport = 0\nhttp_port = 0\n[[pipeline]]\nname = "plain"\nkind = "llm"\n'
        f'path = "{model.folder.parent / "plain"}"\ncache_dir = "{cache}"\n')
    agent = Agent(AgentProcess(tmp_path / "agent.toml", "--grace-s", "0.5"))
    try:
        agent.wait_models(1)
        stream = agent.client.completions.create(model="plain", prompt=[4, 5, 6], max_tokens=LONG, temperature=0,
                                                 stream=True)
        chunks = iter(stream)
        got = [next(chunks)]
        agent.proc.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIConnectionError):             # cut off: no last chunk, no [DONE]
            got += list(chunks)
        assert all(c.choices[0].finish_reason is None for c in got)
        assert agent.stopped() == 0, agent.proc.output()
        assert "Cancel 1 running task(s)" in agent.proc.output() and "agent stopped" in agent.proc.output(), \
            agent.proc.output()
    finally:
        agent.proc.kill()


# --- units: the [serve] keys -------------------------------------------------------------------------
@pytest.mark.parametrize("serve, field", [
    ("http_port = 70000\n", "http_port"),
    ('http_port = "8080"\n', "http_port"),
    ("max_queue = 0\n", "max_queue"),
    ('token_file = 3\n', "token_file"),
])
def test_serve_config_errors_name_the_field(tmp_path, serve, field):
    from edge_runtime.agent.config import AgentConfigError, load_agent_config
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "d"\n[serve]\n{serve}[[pipeline]]\nname = "m"\nkind = "llm"\npath = "x"\n')
    with pytest.raises(AgentConfigError, match=field):
        load_agent_config(path)


def test_serve_config_keys_and_an_empty_token_file(tmp_path):
    from edge_runtime.agent.agent import Agent
    from edge_runtime.agent.config import AgentConfigError, load_agent_config
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "d"\n[serve]\nhttp_port = 8080\ntoken_file = "tok"\nmax_queue = 3\n'
                    '[[pipeline]]\nname = "m"\nkind = "llm"\npath = "x"\nmax_queue = 1\n')
    config = load_agent_config(path)
    assert (config.http_port, config.token_file, config.max_queue) == (8080, tmp_path / "tok", 3)
    assert config.pipelines[0].options == {"max_queue": 1}
    (tmp_path / "tok").write_text("  \n")
    with pytest.raises(AgentConfigError, match="token_file .* empty"):
        Agent(config)
    path.write_text('device_id = "d"\n[[pipeline]]\nname = "m"\nkind = "llm"\npath = "x"\nmax_queue = 0\n')
    with pytest.raises(AgentConfigError, match="max_queue"):
        load_agent_config(path)
    path.write_text('device_id = "d"\n[[pipeline]]\nname = "m"\nkind = "llm"\npath = "x"\n')
    config = load_agent_config(path)
    assert (config.http_port, config.token_file, config.max_queue) == (None, None, 8)
