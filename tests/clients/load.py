"""Load: N concurrent streaming clients (openai SDK, no retries) in two rounds against a server
with few slots and a short queue. Every request must end with a full answer or a 503; the
server's RSS must stay flat between rounds; /metrics must count what the clients saw.
Usage: python load.py BASE_URL API_KEY SERVER_PID CLIENTS"""
import re
import sys
import threading
import time
import urllib.request

import openai

base, key, pid, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)
model = client.models.list().data[0].id
topics = ["the sea", "a city", "music", "winter", "a cat", "trains", "the moon", "bread"]


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def metrics():
    req = urllib.request.Request(base.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {key}"})
    text = urllib.request.urlopen(req).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def one(i, results):
    try:
        text, finish, usage = "", None, None
        for chunk in client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Write two sentences about {topics[i % len(topics)]}."}],
            max_tokens=24,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        ok = finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0
        results.append(("ok", usage.completion_tokens, usage.prompt_tokens) if ok else ("incomplete", finish, text))
    except openai.APIStatusError as e:
        results.append(("503", 0, 0) if e.status_code == 503 else ("error", e.status_code, str(e)))
    except Exception as e:  # noqa: BLE001 — anything else is a failure to report
        results.append(("error", type(e).__name__, str(e)))


def round_(label):
    results = []
    threads = [threading.Thread(target=one, args=(i, results)) for i in range(n)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    kinds = {k: sum(1 for r in results if r[0] == k) for k in ("ok", "503", "incomplete", "error")}
    print(f"{label}: {kinds} in {time.time() - t0:.1f} s, server RSS {rss_kib() / 1024:.1f} MiB")
    bad = [r for r in results if r[0] in ("incomplete", "error")]
    assert not bad and len(results) == n, bad[:5]
    return results


before = metrics()
r1 = round_("round 1")
rss1 = rss_kib()
r2 = round_("round 2")
rss2 = rss_kib()
after = metrics()
results = r1 + r2
ok = [r for r in results if r[0] == "ok"]
rejected = sum(1 for r in results if r[0] == "503")
assert ok, "no request was served"

def delta(name):
    return after.get(name, 0) - before.get(name, 0)

assert delta('dh_requests_total{status="200"}') == len(ok), (delta('dh_requests_total{status="200"}'), len(ok))
assert delta('dh_requests_total{status="503"}') == rejected, (delta('dh_requests_total{status="503"}'), rejected)
assert delta("dh_generated_tokens_total") == sum(r[1] for r in ok), (delta("dh_generated_tokens_total"), sum(r[1] for r in ok))
assert delta("dh_prompt_tokens_total") == sum(r[2] for r in ok)
assert delta("dh_time_to_first_token_seconds_count") == len(ok)
growth = rss2 - rss1
print(f"served {len(ok)}, rejected {rejected}; RSS round 1 {rss1 / 1024:.1f} MiB, round 2 {rss2 / 1024:.1f} MiB (+{growth / 1024:.1f} MiB)")
assert growth < max(0.05 * rss1, 16 * 1024), "RSS grew between rounds"
print("LOAD OK")
