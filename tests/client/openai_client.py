"""Drives `zmoe serve` with the official `openai` Python client (pinned in requirements.txt).

Run by tests/serve.rs::openai_python_client against a server it starts on the tiny model:
non-streaming and streaming chat and completions, include_usage, logprobs, seeds, stop
strings, and the errors the client raises for bad input, a wrong key and an unknown model.
Every check is an assert; the last line printed says all passed.
"""

import argparse
import sys

import openai

p = argparse.ArgumentParser()
p.add_argument("--base-url", required=True)
p.add_argument("--api-key", required=True)
p.add_argument("--model", required=True)
args = p.parse_args()

client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
M = args.model
MSGS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Which experts does the router pick?"},
]
GREEDY = dict(temperature=0, max_tokens=10, extra_body={"ignore_eos": True})

# Models.
models = client.models.list()
assert [m.id for m in models.data] == [M], models
assert client.models.retrieve(M).id == M

# Chat, not streamed: the client's typed objects parse.
r = client.chat.completions.create(model=M, messages=MSGS, **GREEDY)
assert r.object == "chat.completion" and r.id.startswith("chatcmpl-"), r
c = r.choices[0]
assert c.message.role == "assistant" and isinstance(c.message.content, str), c
assert c.finish_reason == "length", c
assert r.usage.completion_tokens == 10 and r.usage.total_tokens == r.usage.prompt_tokens + 10, r.usage
text = c.message.content

# Chat, streamed with include_usage: role first, finish reason last, usage chunk, same text.
chunks = list(
    client.chat.completions.create(
        model=M, messages=MSGS, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
)
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
usage = chunks[-1]
assert usage.choices == [] and usage.usage.completion_tokens == 10, usage
last = chunks[-2].choices[0]
assert last.finish_reason == "length" and not last.delta.content, last
assert all(ch.choices[0].finish_reason is None for ch in chunks[:-2])
streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
assert streamed == text, (streamed, text)

# Streaming without include_usage: no usage chunk.
chunks = list(client.chat.completions.create(model=M, messages=MSGS, stream=True, **GREEDY))
assert chunks[-1].choices[0].finish_reason == "length" and all(ch.usage is None for ch in chunks)

# Logprobs (chat): one entry per token, top_logprobs of the size asked, log-probabilities ≤ 0.
r = client.chat.completions.create(model=M, messages=MSGS, logprobs=True, top_logprobs=4, **GREEDY)
content = r.choices[0].logprobs.content
assert len(content) == 10, len(content)
for e in content:
    assert e.logprob <= 0 and len(e.top_logprobs) == 4, e
    assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
    # Greedy: the chosen token is the most likely one.
    assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6, e

# Logprobs streamed: every content chunk carries its tokens' entries.
n = 0
for ch in client.chat.completions.create(model=M, messages=MSGS, stream=True, logprobs=True, **GREEDY):
    if ch.choices and ch.choices[0].logprobs is not None:
        n += len(ch.choices[0].logprobs.content)
assert n == 10, n

# Completions: text prompt, token prompt; streamed equals not streamed; logprobs arrays.
r = client.completions.create(model=M, prompt="The router picks", logprobs=2, **GREEDY)
assert r.object == "text_completion" and r.choices[0].finish_reason == "length", r
lp = r.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10, lp
ctext = r.choices[0].text
chunks = list(
    client.completions.create(
        model=M, prompt="The router picks", stream=True, stream_options={"include_usage": True}, **GREEDY
    )
)
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
assert "".join(ch.choices[0].text for ch in chunks[:-1]) == ctext
r = client.completions.create(model=M, prompt=[5, 17, 300], **GREEDY)
assert r.usage.prompt_tokens == 3, r.usage

# Stop string: the output ends before it.
if len(ctext) > 4:
    stop = ctext[len(ctext) // 2 :][:3]
    r = client.completions.create(model=M, prompt="The router picks", stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == ctext[: ctext.find(stop)], r

# Seeds: the same seed repeats.
def sampled(seed):
    return client.completions.create(
        model=M, prompt="Once", temperature=1.0, seed=seed, max_tokens=12, extra_body={"ignore_eos": True}
    ).choices[0].text

assert sampled(3) == sampled(3)

# Errors the client raises, with the server's status and message.
def raises(exc, **kw):
    try:
        client.chat.completions.create(**kw)
    except exc as e:
        assert e.body is None or "message" in (e.body if isinstance(e.body, dict) else {}), e.body
        return e
    raise AssertionError(f"no {exc.__name__} for {kw}")

e = raises(openai.NotFoundError, model="not-a-model", messages=MSGS)
assert e.status_code == 404
e = raises(openai.BadRequestError, model=M, messages=MSGS, max_tokens=0)
assert e.status_code == 400 and e.body.get("param") == "max_tokens", e.body
e = raises(openai.BadRequestError, model=M, messages=MSGS, n=2)
assert e.body.get("param") == "n", e.body
e = raises(openai.BadRequestError, model=M, messages=MSGS, temperature=5)
assert e.body.get("param") == "temperature", e.body
bad = openai.OpenAI(base_url=args.base_url, api_key="wrong-key", max_retries=0)
try:
    bad.models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401

print(f"openai {openai.__version__}: models, chat and completions (streamed and not, include_usage, logprobs, stop, seed), errors")
print("openai client: all checks passed")
sys.exit(0)
