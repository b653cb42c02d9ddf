"""docs/api.md's curl examples, replayed against a real proxy started as
the document says: every ``$ command`` of a ``console`` block runs in one
bash (so ``SID=...`` carries over) and prints what the document shows.
JSON lines are compared as JSON; a string with ``…`` in the document
matches any text with the same start and end."""

import json
import os
import re
import subprocess

from support import HOST

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "api.md")
TOKEN = "s3cret"


def examples():
    """[(command, expected output lines)] of every console block."""
    text = open(DOC, encoding="utf-8").read()
    out = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                out.append((line[2:], []))
            else:
                out[-1][1].append(line)
    return out


def same(doc, got):
    if isinstance(doc, str) and "…" in doc:
        head, tail = doc.split("…", 1)
        return isinstance(got, str) and got.startswith(head) and got.endswith(tail) and len(got) > len(doc) - 1
    if isinstance(doc, dict):
        return isinstance(got, dict) and doc.keys() == got.keys() and all(same(doc[k], got[k]) for k in doc)
    if isinstance(doc, list):
        return isinstance(got, list) and len(doc) == len(got) and all(same(a, b) for a, b in zip(doc, got))
    return doc == got


def compact(value):
    """JSON as the API writes it: no spaces, UTF-8 (frontends/jsonapi.py ``to_json``)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def same_line(doc, got):
    if doc[:1] in "[{":
        m = re.fullmatch(r"(.*?)( \d{3})?", doc)
        g = re.fullmatch(r"(.*?)( \d{3})?", got)
        try:
            doc_value = json.loads(m.group(1))
            return (m.group(2) == g.group(2) and same(doc_value, json.loads(g.group(1)))
                    and m.group(1) == compact(doc_value))  # the docs show the bytes as sent
        except ValueError:
            return False
    return same(doc, got)


def test_curl_examples_replay(proxy_factory):
    proxy = proxy_factory("--api", f"tcp:0:interface={HOST}", "--api-cors-origin", "http://127.0.0.1:8000",
                          "--backend", "emulated:?cards=2", "--backend", "emulated:?type=piv&cards=1&prefix=PIV",
                          listeners=2, env={"FOXYPROXY_API_TOKEN": TOKEN})
    cases = examples()
    assert len(cases) >= 12
    script = "".join(f"echo '@@{n}@@'\n{command}\n" for n, (command, _) in enumerate(cases))
    env = dict(os.environ, API=f"http://{HOST}:{proxy.ports['ApiSite'][0]}", TOKEN=TOKEN)
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    outputs = re.split(r"^@@\d+@@\n", run.stdout, flags=re.M)[1:]
    assert len(outputs) == len(cases), run.stdout + run.stderr
    documented = {c for c, _ in cases}
    for (command, want), got in zip(cases, outputs):
        lines = got.splitlines()
        assert len(lines) == len(want) and all(same_line(w, g) for w, g in zip(want, lines)), (command, want, lines)
    # every route of the API has an example
    for method, route in [("GET", "/api/v1/readers"), ("POST", "/transmit"), ("POST", "/api/v1/sessions"),
                          ("DELETE", "/api/v1/sessions/"), ("GET", "/api/v1/certificates"), ("GET", "/chain"),
                          ("POST", "/sign"), ("GET", "/api/v1.0/hello"), ("POST", "/api/v1.0/command"),
                          ("GET", "/api/v1.0/select/")]:
        assert any(route in c for c in documented), route
