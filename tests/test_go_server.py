"""The Go engine's server as real clients use it: the official `openai` Python
package (chat and completions, streamed and not, stop sequences, logprobs, the
API key), the bounded queue, cancellation on disconnect, graceful SIGTERM, and
the chat page driven in headless Chromium. Servers bind to 127.0.0.1 only."""
from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, str(Path(__file__).parent))
import go_fixtures as F  # noqa: E402

KEY = "test-key-123"


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return F.build_engine(tmp_path_factory.mktemp("gobin"))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return F.sp_vocab(F.train_sp(tmp_path_factory.mktemp("goserver_sp")))


def server_model(tmp_path_factory, vocab, seed: int, *, ctx: int = 512, **shape) -> Path:
    """A random llama GGUF named tiny.gguf (the server calls its model by the file's stem)."""
    n_head, n_kv = shape.pop("n_head"), shape.pop("n_kv")
    params = F.random_params(vocab=len(vocab[0]), n_head=n_head, n_kv=n_kv, seed=seed, **shape)
    return F.write_model(tmp_path_factory.mktemp("goserver") / "tiny.gguf", params, vocab, n_head=n_head, n_kv=n_kv,
                         ctx=ctx)


@pytest.fixture(scope="module")
def model(tmp_path_factory, vocab) -> Path:
    return server_model(tmp_path_factory, vocab, 3, dim=64, n_layer=1, n_head=4, n_kv=2, head_dim=16, ffn=128)


# Greedy, no repetition penalty, one thread: replies are reproducible.
SERVER_FLAGS = ("--threads", "1", "--temp", "0", "--rep-penalty", "1")


def serve(engine: Path, model: Path, *args: str) -> F.Server:
    return F.Server(engine, model, *SERVER_FLAGS, *args)


@pytest.fixture(scope="module")
def server(engine, model):
    s = serve(engine, model, "--api-key", KEY, "--parallel", "2")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_completions_stream_equals_whole(client):
    whole = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=20)
    text = whole.choices[0].text
    assert text and whole.usage.completion_tokens > 1 and whole.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=20, stream=True) if c.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == text


def test_openai_chat_stream_equals_whole_and_usage(client):
    msgs = [{"role": "user", "content": "Hello there, model!"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=16)
    content = whole.choices[0].message.content
    assert content and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_stop_sequences(client):
    text = client.completions.create(model="tiny", prompt="The model", max_tokens=30).choices[0].text
    # Two stop strings, one of them from the middle of the greedy text.
    mid = len(text) // 2
    stop = text[mid:mid + 3]
    assert len(stop) == 3, text
    want = text[:text.index(stop)]
    r = client.completions.create(model="tiny", prompt="The model", max_tokens=30, stop=["\x00never", stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The model", max_tokens=30, stop=stop, stream=True) if c.choices)
    assert streamed == want


def test_openai_logprobs_and_errors(client, server):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="tiny", prompt="x", n=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_metrics_tokenize_detokenize(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    status, _, body = server.request("POST", "/tokenize", {"content": "the quick fox"}, auth)
    ids = json.loads(body)["tokens"]
    assert status == 200 and ids[0] == 1 and len(ids) > 2
    status, _, body = server.request("POST", "/detokenize", {"tokens": ids[1:]}, auth)
    assert status == 200 and json.loads(body)["content"].strip() == "the quick fox"
    status, _, body = server.request("GET", "/metrics", headers=auth)
    metrics = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if not line.startswith("#"))
    assert status == 200 and float(metrics["nanollama_generated_tokens_total"]) > 0


@pytest.fixture(scope="module")
def slower_model(tmp_path_factory, vocab) -> Path:
    """About 25M parameters: on one thread a 2000-token reply takes tens of seconds on any machine, so it is
    still streaming when the queue is probed or Stop is pressed (a 4-layer d256 model finished in 3 s)."""
    return server_model(tmp_path_factory, vocab, 5, ctx=2048, dim=512, n_layer=8, n_head=8, n_kv=4, head_dim=64,
                        ffn=1536)


def test_queue_full_503_and_disconnect_frees_the_session(engine, slower_model):
    s = serve(engine, slower_model, "--parallel", "1", "--queue", "0", "--ignore-eos", "--ctx", "2048")
    try:
        t0 = time.monotonic()
        conn, r = s.open_stream({"prompt": "A long story", "max_tokens": 2000})
        r.read1(65536)
        first = time.monotonic() - t0  # prefill and a token or two
        status, headers, body = s.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 503 and headers.get("Retry-After") and b"busy" in body
        conn.close()  # the client goes away mid-generation: its session comes free
        t1 = time.monotonic()
        while True:
            status, _, _ = s.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
            if status == 200 or time.monotonic() - t1 > 60:
                break
            time.sleep(0.05)
        freed = time.monotonic() - t1
        assert status == 200
        # 2000 tokens take hundreds of first-token times; freeing took a few.
        assert freed < 20 * first + 1, (freed, first)
    finally:
        s.close()


def test_sigterm_finishes_running_requests(engine, model):
    s = serve(engine, model, "--parallel", "1", "--ignore-eos")
    try:
        conn, r = s.open_stream({"prompt": "A long story", "max_tokens": 300})
        s.proc.send_signal(signal.SIGTERM)
        rest = r.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in rest
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    b = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")), options=opts)
    yield b
    b.quit()


def test_chat_page_in_chromium(engine, slower_model, browser):
    s = serve(engine, slower_model, "--parallel", "1", "--ignore-eos", "--ctx", "2048", "--threads", "1")
    try:
        browser.get(f"http://127.0.0.1:{s.port}/")
        wait = WebDriverWait(browser, 30, poll_frequency=0.05)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "tiny")
        assert "{{" not in browser.page_source
        # A short reply completes and reports its speed.
        maxt = browser.find_element(By.ID, "maxt")
        maxt.clear()
        maxt.send_keys("12")
        browser.find_element(By.ID, "q").send_keys("Hello there", Keys.ENTER)
        wait.until(lambda b: "tok/s" in b.find_element(By.ID, "stats").text)
        replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello there"
        assert len(replies) == 1 and replies[0].text.strip()
        # A long reply streams in (its text grows) until Stop ends it.
        maxt.clear()
        maxt.send_keys("2000")
        browser.find_element(By.ID, "q").send_keys("Tell me more", Keys.ENTER)
        reply = lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text  # noqa: E731
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2 and len(reply(b)) > 0)
        first = len(reply(browser))
        wait.until(lambda b: len(reply(b)) > first)
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda b: reply(b).endswith("[stopped]"))
        assert browser.find_element(By.ID, "stop").get_attribute("disabled")
    finally:
        s.close()
