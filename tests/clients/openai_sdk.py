"""The official openai Python SDK against dh-server: plain and streamed chat, models, tool calls
with tool_choice required and named, and a json_schema response validated with jsonschema.
Usage: python openai_sdk.py BASE_URL API_KEY"""
import json
import sys

import jsonschema
import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key=key)

models = client.models.list()
model = models.data[0].id
print("models:", [m.id for m in models.data])

r = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24,
    temperature=0,
)
text = r.choices[0].message.content
assert text and r.usage.completion_tokens > 0, r
print("chat:", repr(text))

pieces, usage, finish = [], None, None
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        pieces.append(c.delta.content or "")
        finish = c.finish_reason or finish
assert "".join(pieces) == text, ("".join(pieces), text)
assert usage and usage.completion_tokens == r.usage.completion_tokens, usage
assert usage.prompt_tokens_details.cached_tokens > 0, usage
print("stream: same text, finish", finish, "cached", usage.prompt_tokens_details.cached_tokens)

weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
clock = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 40}},
            "required": ["timezone"],
        },
    },
}
tools = [weather, clock]
by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}

for choice in ["required", {"type": "function", "function": {"name": "get_time"}}]:
    for stream in (False, True):
        kwargs = dict(
            model=model,
            messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
            tools=tools,
            tool_choice=choice,
            max_tokens=80,
            temperature=0,
        )
        if stream:
            calls, finish = {}, None
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for c in chunk.choices:
                    finish = c.finish_reason or finish
                    for tc in c.delta.tool_calls or []:
                        slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                        if tc.function.name:
                            slot["name"] = tc.function.name
                        slot["arguments"] += tc.function.arguments or ""
            got = list(calls.values())
        else:
            r = client.chat.completions.create(**kwargs)
            finish = r.choices[0].finish_reason
            got = [{"name": c.function.name, "arguments": c.function.arguments} for c in r.choices[0].message.tool_calls]
        assert finish == "tool_calls", finish
        assert len(got) >= 1, got
        call = got[0]
        if isinstance(choice, dict):
            assert call["name"] == "get_time", call
        args = json.loads(call["arguments"])
        jsonschema.validate(args, by_name[call["name"]])
        print(f"tool_choice={json.dumps(choice)} stream={stream}: {call['name']}({call['arguments']})")

# A tool result goes back in and the model answers in text.
r = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "user", "content": "What's the weather like in Paris today?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"sunny\"}"},
    ],
    tools=tools,
    tool_choice="none",
    max_tokens=32,
    temperature=0,
)
assert r.choices[0].message.content, r
print("after tool result:", repr(r.choices[0].message.content))

schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Invent a person."}],
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    max_tokens=120,
    temperature=0,
)
person = json.loads(r.choices[0].message.content)
jsonschema.validate(person, schema)
print("json_schema:", person)

try:
    openai.OpenAI(base_url=base, api_key="wrong").models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    print("wrong key:", e.status_code)

print("OPENAI SDK OK")
