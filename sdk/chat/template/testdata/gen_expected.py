"""Renders testdata/cases.json with every template in testdata/templates using
Python's Jinja2 configured like Hugging Face's apply_chat_template, and writes
testdata/expected.json. The Go test compares the Go renderer with it.

    python3 sdk/chat/template/testdata/gen_expected.py
"""
import datetime
import json
import os

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
NOW = datetime.datetime(2026, 11, 25, 18, 43, 0)
BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"


class TemplateError(Exception):
    pass


def raise_exception(msg):
    raise TemplateError(msg)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def env():
    e = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    e.filters["tojson"] = tojson
    e.globals["raise_exception"] = raise_exception
    e.globals["strftime_now"] = lambda f: NOW.strftime(f)
    return e


def parse_json(s):
    try:
        return json.loads(s)
    except Exception:
        return s


def to_hf(m):
    """The same dicts sdk/chat/template.Data builds, in the same key order."""
    d = {"role": m["role"], "content": m.get("content", "")}
    if m.get("name"):
        d["name"] = m["name"]
    if m.get("tool_call_id"):
        d["tool_call_id"] = m["tool_call_id"]
    if m.get("reasoning_content"):
        d["reasoning_content"] = m["reasoning_content"]
        d["thinking"] = m["reasoning_content"]
    if m.get("tool_calls"):
        calls = []
        for c in m["tool_calls"]:
            call = {}
            if c.get("id"):
                call["id"] = c["id"]
            call["type"] = "function"
            call["function"] = {"name": c["name"], "arguments": parse_json(c["arguments"])}
            calls.append(call)
        d["tool_calls"] = calls
    return d


def main():
    with open(os.path.join(HERE, "cases.json"), encoding="utf-8") as f:
        spec = json.load(f)
    tools = [{"type": "function", "function": t} for t in spec["tools"]]
    e = env()
    out = {}
    tdir = os.path.join(HERE, "templates")
    for name in sorted(os.listdir(tdir)):
        with open(os.path.join(tdir, name), encoding="utf-8") as f:
            tmpl = e.from_string(f.read())
        for case in spec["cases"]:
            data = {
                "messages": [to_hf(m) for m in case["messages"]],
                "add_generation_prompt": not case.get("no_gen", False),
                "bos_token": BOS,
                "eos_token": EOS,
                "date_string": "25 Nov 2026",
            }
            if case.get("tools"):
                data["tools"] = tools
            key = name + "/" + case["name"]
            try:
                out[key] = {"text": tmpl.render(**data)}
            except Exception as ex:  # raise_exception and template bugs alike
                out[key] = {"error": "%s: %s" % (type(ex).__name__, ex)}
    with open(os.path.join(HERE, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
