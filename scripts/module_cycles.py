#!/usr/bin/env python3
"""Import cycles between the crate's modules (issue 25's check; no build needed).

usage: python3 scripts/module_cycles.py [DEPTH] [PREFIX]
  DEPTH   how many path segments name a module (2: kv::store, kv::codec; 1: kv, model)
  PREFIX  only cycles with a module starting so (e.g. kv)

Reads every src/**/*.rs but src/cli (the binary's front), outside `#[cfg(test)] mod tests`,
and counts each `use` path (brace groups expanded) and each `crate::…`/`super::…` path in code
as an edge from the file's module to the one it names. Prints each strongly connected set of
more than one module with the edges inside it; exits 1 when there is one.
"""
import os
import re
import sys

ROOT = "src"


def module_of(path):
    parts = os.path.relpath(path, ROOT)[:-3].split("/")
    return parts[:-1] if parts[-1] in ("mod", "lib", "main") else parts


def expand(use):
    """`a::{b, c::{d, e}}` -> [`a::b`, `a::c::d`, `a::c::e`]."""
    m = re.match(r"^(.*?)\{(.*)\}$", use.strip(), re.S)
    if not m:
        return [use.strip()]
    prefix, body = m.groups()
    parts, depth, cur = [], 0, ""
    for ch in body:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for part in parts if part.strip() for p in expand(prefix + part.strip())]


def edges(depth):
    out = set()
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(folder, name)
            me = module_of(path)
            if not me or me[0] == "cli":
                continue
            src = re.sub(r"#\[cfg\(test\)\]\s*mod tests \{.*", "", open(path).read(), flags=re.S)
            paths = [p for u in re.findall(r"\buse\s+([^;]+);", src) for p in expand(u)]
            paths += re.findall(r"\b((?:crate|super)(?:::[A-Za-z_]\w*)+)", src)
            for p in paths:
                segs = p.replace(" ", "").split("::")
                if segs[0] == "crate":
                    target = segs[1:]
                elif segs[0] in ("super", "self"):
                    cur, i = list(me), 0
                    while i < len(segs) and segs[i] in ("super", "self"):
                        cur = cur[:-1] if segs[i] == "super" else cur
                        i += 1
                    target = cur + segs[i:]
                else:
                    continue
                a, b = tuple(me[:depth]), tuple(target[:depth])
                # a module and its own parent or child are one unit at this depth
                if a and b and a != b and a[: len(b)] != b and b[: len(a)] != a:
                    out.add((a, b))
    return out


def cycles(graph):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main():
    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    prefix = sys.argv[2] if len(sys.argv) > 2 else ""
    graph = {}
    for a, b in edges(depth):
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    bad = [c for c in cycles(graph) if any("::".join(m).startswith(prefix) for m in c)]
    for comp in bad:
        print("cycle:", ", ".join(sorted("::".join(m) for m in comp)))
        for a in comp:
            for b in sorted(graph[a]):
                if b in comp:
                    print(f"    {'::'.join(a)} -> {'::'.join(b)}")
    if not bad:
        print("no cycles")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
