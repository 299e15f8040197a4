"""hermes-agent (Nous Research, from PyPI) on dh-server as a custom OpenAI-compatible endpoint:
a one-shot task that needs the read_file tool. Hermes is configured like any user would for a
small local model: its file toolset only, and `tool_choice` naming the tool through its
request_overrides. Usage: python hermes_task.py BASE_URL API_KEY WORKDIR"""
import json
import os
import sys

base, key, work = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ["HERMES_HOME"] = os.path.join(work, "hermes-home")
# Hermes describes its working directory's git state in the system prompt; run it in the task's
# own folder, as a user would, so the prompt does not change with this repository's commits.
os.chdir(work)
secret = os.path.join(work, "secret.txt")
with open(secret, "w") as f:
    f.write("The launch code is TANGO-42.\n")

from run_agent import AIAgent  # noqa: E402  (HERMES_HOME must be set first)

agent = AIAgent(
    base_url=base,
    api_key=key,
    model="smollm2",
    provider="custom",
    enabled_toolsets=["file"],
    quiet_mode=True,
    skip_context_files=True,
    skip_memory=True,
    max_iterations=1,
    max_tokens=256,
    tool_delay=0,
    request_overrides={"tool_choice": {"type": "function", "function": {"name": "read_file"}}, "temperature": 0},
)
result = agent.run_conversation(f"Read the file {secret} and tell me the launch code.")
messages = result["messages"]
calls = [c for m in messages if m.get("role") == "assistant" for c in (m.get("tool_calls") or [])]
assert calls, json.dumps(messages, default=str)[:2000]
call = calls[0]["function"]
args = json.loads(call["arguments"])
print("hermes called:", call["name"], args)
assert call["name"] == "read_file", call
results = [m for m in messages if m.get("role") == "tool"]
assert results and "TANGO-42" in results[0]["content"], results
assert result.get("final_response"), result
print("hermes final response:", repr(result["final_response"][:200]))
print("HERMES OK")
