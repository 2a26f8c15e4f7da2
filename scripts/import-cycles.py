#!/usr/bin/env python3
"""Fails if a file of the library imports a file that imports it back, directly or through
others (issue 8's layering rule). Reads `use crate::…` / `crate::…` paths and `super::` paths of
every file under src/ (test modules included), maps each to the file that defines the module,
and looks for cycles in that file graph. `mod.rs` files that only declare and re-export modules
are roots, not layers, so edges into a directory's mod.rs are not counted."""
import os, re, sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
files = {}
for d, _, names in os.walk(root):
    for n in names:
        if n.endswith(".rs"):
            p = os.path.relpath(os.path.join(d, n), root)
            files[p] = open(os.path.join(d, n)).read()

def module_path(p):
    parts = p[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return parts

mods = {tuple(module_path(p)): p for p in files}

def reexports(p):
    """Item name -> module path, for the `pub use` lines of a module root (lib.rs, mod.rs)."""
    out, me = {}, module_path(p)
    text = re.sub(r"//[^\n]*", "", files[p])
    for m in re.finditer(r"pub(?:\([a-z]+\))?\s+use\s+([^;]+);", text):
        body = m.group(1).replace("\n", " ")
        prefix_m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_:]*?)::\{(.*)\}\s*$", body)
        items = []
        if prefix_m:
            prefix = prefix_m.group(1).split("::")
            for item in prefix_m.group(2).split(","):
                item = item.strip().split(" as ")[0].strip()
                if item:
                    items.append(prefix + item.split("::"))
        else:
            items.append(body.strip().split(" as ")[0].strip().split("::"))
        for path in items:
            if path[0] == "crate":
                full = path[1:]
            elif path[0] == "self":
                full = me + path[1:]
            else:
                full = me + path
            out[path[-1]] = full
    return out

def resolve(segments, depth=0):
    """The file defining `segments`: the longest module prefix that is a file, following the
    re-exports of module roots to the file that really defines the item."""
    for k in range(len(segments), 0, -1):
        f = mods.get(tuple(segments[:k]))
        if f:
            base = os.path.basename(f)
            if base in ("mod.rs", "lib.rs") and k < len(segments) and depth < 8:
                target = reexports(f).get(segments[k])
                if target:
                    return resolve(target + segments[k + 1:], depth + 1) or f
            return f
    return None

edges = {p: set() for p in files}
use_re = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
for p, text in files.items():
    text = re.sub(r"//[^\n]*", "", text)
    me = module_path(p)
    # `super` of a file foo.rs (module a::foo) is a; of a/mod.rs (module a) is the parent.
    for m in use_re.finditer(text):
        segs = m.group(2).split("::")[1:]
        if m.group(1) == "crate":
            base = []
        else:
            base = me[:-1]
        target = resolve(base + segs)
        # A brace list: `crate::a::{b, c::D}` — resolve each item under the prefix.
        tail = text[m.end():m.end() + 1]
        if tail == ":" and text[m.end():m.end() + 3] == "::{":
            depth, i = 0, m.end() + 2
            j = i
            while j < len(text):
                if text[j] == "{": depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0: break
                j += 1
            for item in re.findall(r"[A-Za-z_][A-Za-z0-9_:]*", text[i + 1:j]):
                t = resolve(base + segs + item.split("::"))
                if t: edges[p].add(t)
        if target:
            edges[p].add(target)
    edges[p].discard(p)

# Module roots (lib.rs, */mod.rs) declare and re-export; they are not layers.
roots = {p for p in files if os.path.basename(p) in ("mod.rs", "lib.rs")}
graph = {p: {t for t in ts if t not in roots} for p, ts in edges.items() if p not in roots}

cycles, state, stack = [], {}, []
def visit(n):
    state[n] = 1; stack.append(n)
    for t in sorted(graph.get(n, ())):
        if state.get(t) == 1:
            cycles.append(stack[stack.index(t):] + [t])
        elif t not in state:
            visit(t)
    stack.pop(); state[n] = 2
for n in sorted(graph):
    if n not in state:
        visit(n)
if cycles:
    for c in cycles:
        print("import cycle: " + " -> ".join(c))
    sys.exit(1)
print(f"import-cycles: {len(graph)} files, no cycle")
