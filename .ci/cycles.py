#!/usr/bin/env python3
"""Import cycles between the modules of a crate.

An edge A -> B means a `use` in module A names an item that module B
defines. Re-exports (`pub use` in a facade such as lib.rs or mod.rs) are
followed to the module that defines the item, and are no edges themselves;
a child's `use super::x::Y` is an edge to `x`. Any cycle is printed and the
exit status is 1.

    .ci/cycles.py crates/gmem/src crates/gmem-vmm/src
"""

import re
import sys
from pathlib import Path

USE = re.compile(r"^\s*(pub(?:\([a-z]+\))?\s+)?use\s+([^;]+);", re.M)
ITEM = re.compile(
    r"^\s*(?:pub(?:\([a-z]+\))?\s+)?(?:unsafe\s+)?(?:struct|enum|trait|fn|const|static|type|mod)\s+([A-Za-z_][A-Za-z0-9_]*)",
    re.M,
)


def module_of(root: Path, path: Path) -> tuple:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("lib", "mod", "main"):
        parts = parts[:-1]
    return tuple(parts)


def expand(tree: str) -> list:
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    tree = re.sub(r"\s+", "", tree)
    out = []

    def walk(prefix: str, t: str):
        if "{" not in t:
            for p in split_top(t):
                out.append(prefix + p)
            return
        i = t.index("{")
        head, body = t[:i], t[i + 1 : t.rindex("}")]
        for p in split_top(body):
            walk(prefix + head, p)

    def split_top(s: str) -> list:
        parts, depth, cur = [], 0, ""
        for c in s:
            if c == "," and depth == 0:
                parts.append(cur)
                cur = ""
                continue
            depth += c == "{"
            depth -= c == "}"
            cur += c
        if cur:
            parts.append(cur)
        return parts

    walk("", tree)
    return [re.sub(r"\s+as\s+.*$", "", p) for p in out]


def analyse(root: Path) -> int:
    files = {module_of(root, p): p for p in root.rglob("*.rs")}
    text = {m: re.sub(r"//[^\n]*", "", p.read_text()) for m, p in files.items()}
    # A file included with #[path] or `mod tests;` is part of its parent.
    defines = {m: set(ITEM.findall(t)) for m, t in text.items()}
    uses = {m: [] for m in files}
    reexports = {m: {} for m in files}
    for m, t in text.items():
        for vis, tree in USE.findall(t):
            for path in expand(tree):
                segs = path.split("::")
                if segs[0] == "crate":
                    target = segs[1:]
                elif segs[0] == "super":
                    base = list(m)
                    while segs and segs[0] == "super":
                        base = base[:-1]
                        segs = segs[1:]
                    target = base + segs
                elif segs[0] == "self":
                    target = list(m) + segs[1:]
                elif tuple(list(m) + segs[:1]) in files:
                    target = list(m) + segs
                else:
                    continue  # another crate
                if vis:
                    reexports[m][target[-1]] = target
                else:
                    uses[m].append(target)

    def resolve(target: list, seen=()) -> tuple:
        # The longest prefix that is a module; the rest is an item there.
        for n in range(len(target), -1, -1):
            mod = tuple(target[:n])
            if mod in files:
                rest = target[n:]
                if not rest or rest == ["self"]:
                    return mod
                name = rest[0]
                if name in defines[mod] or mod in seen:
                    return mod
                if name in reexports[mod]:
                    return resolve(reexports[mod][name], seen + (mod,))
                return mod
        return None

    edges = {m: set() for m in files}
    for m, targets in uses.items():
        for t in targets:
            d = resolve(t)
            if d is not None and d != m:
                edges[m].add(d)
    # Tarjan's strongly connected components.
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
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
                comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in files:
        if v not in index:
            strong(v)
    name = lambda m: "::".join(m) or "(crate root)"
    for comp in comps:
        print(f"{root}: import cycle among " + ", ".join(sorted(name(m) for m in comp)))
        for m in comp:
            for d in sorted(edges[m] & set(comp)):
                print(f"    {name(m)} -> {name(d)}")
    if not comps:
        print(f"{root}: {len(files)} modules, {sum(len(e) for e in edges.values())} edges, no import cycle")
    return len(comps)


if __name__ == "__main__":
    bad = sum(analyse(Path(a)) for a in sys.argv[1:])
    sys.exit(1 if bad else 0)
