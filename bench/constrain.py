"""Constrained decoding libraries on our tokenizer, side by side: llguidance, outlines-core, xgrammar.

    python bench/constrain.py [--vocab 4096 32768] [--walks 12] [--steps 200]

Each library that is installed gets the same tokenizers (ours, trained here at each vocabulary size on the
generated world plus Python stdlib source, with our special tokens) and the same grammars:
  person   a flat object schema (string, integer with bounds, enum, optional boolean)
  nested   objects in arrays, maxItems, minimum/maximum, a string pattern, nested required fields
  any      "any JSON object" (response_format json_object)
  tool     <tool_call> "\\n" {"name": one of 3 tools, "arguments": that tool's schema} "\\n" </tool_call>,
           the markers being special token ids (what tool_choice needs)
All use json.dumps's default separators (", " and ": ") and no other whitespace, the shape our model writes.
Measured: the import, the tokenizer adapter, each grammar's compile time (best of 3), and the per-token cost
of one mask + one advance over random walks through the grammar (a walk picks uniformly among allowed tokens,
but prefers tokens that close strings/containers so walks end; the best walk's mean is kept, as load on a
shared machine only adds time). Correctness, per grammar: every finished walk
parses and validates; json.dumps of valid instances, encoded by our tokenizer, is accepted token by token
and then allows <|assistant_end|>; a wrong token (e.g. a letter where an integer must come) is refused;
special tokens other than the allowed markers never appear in a mask. Install sizes come from the installed
files of each package and of its requirements that exocortex does not already need.

Install them where you like (pip install llguidance outlines-core xgrammar); missing ones are skipped. Prints
a table, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from exocortex.tokenizer import CALL_END, CALL_START, Tokenizer  # noqa: E402

END = "<|assistant_end|>"

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "town"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "town": {"enum": ["Tarsk", "Hiswick", "Mora"]},
                         "married": {"type": "boolean"}}}
NESTED = {"type": "object", "additionalProperties": False, "required": ["order", "items"],
          "properties": {"order": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                         "items": {"type": "array", "maxItems": 3, "items": {
                             "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                             "properties": {"sku": {"type": "string", "maxLength": 8},
                                            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                                            "price": {"type": "number"}}}},
                         "note": {"type": ["string", "null"]}}}
ANY: dict = {"type": "object"}
TOOLS = [("calculator", {"type": "object", "properties": {"expression": {"type": "string"}},
                         "required": ["expression"], "additionalProperties": False}),
         ("python", {"type": "object", "properties": {"code": {"type": "string"}},
                     "required": ["code"], "additionalProperties": False}),
         ("lookup", {"type": "object", "properties": {"query": {"type": "string"}},
                     "additionalProperties": False})]
TOOL_SCHEMA = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                          "properties": {"name": {"const": n}, "arguments": p}} for n, p in TOOLS]}

# valid instances: json.dumps of each must be accepted token by token
GOOD = {
    "person": [{"name": "Mira", "age": 34, "town": "Tarsk"}, {"name": "", "age": 0, "town": "Mora", "married": True}],
    "nested": [{"order": "AB-123", "items": [{"sku": "x1", "qty": 2, "price": 1.5}], "note": None},
               {"order": "ZZ-000", "items": []}],
    "any": [{"a": [1, 2.5, {"b": None}], "c": "héllo 日本", "d": True}, {}],
    "tool": [{"name": "calculator", "arguments": {"expression": "347 * 29"}},
             {"name": "lookup", "arguments": {}}],
}
# (valid prefix, a continuation the grammar must refuse)
BAD = {"person": ('{"name": "Mira", "age": ', "x"), "nested": ('{"order": "', "a"),
       "any": ("{", "1"), "tool": ('{"name": "', "z")}


# ----------------------------------------------------------------------------------------- the corpus
def corpus(target_bytes: int) -> list[str]:
    """The generated world (English-like text) plus raw stdlib source: enough distinct words for 32k merges."""
    from exocortex.data.world import generate_documents

    docs = generate_documents(seed=0, target_bytes=target_bytes // 4)
    total = sum(len(d) for d in docs)
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if total >= target_bytes:
            break
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        total += len(docs[-1])
    return docs


def validate(value, schema: dict) -> bool:
    """The JSON-schema subset these schemas use (jsonschema is not required to run the bench)."""
    if "anyOf" in schema:
        return any(validate(value, s) for s in schema["anyOf"])
    if "const" in schema:
        return value == schema["const"]
    if "enum" in schema:
        return value in schema["enum"]
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types
    if types is not None:
        kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
        ok = any((t == "integer" and isinstance(value, int) and not isinstance(value, bool))
                 or (t == "number" and isinstance(value, (int, float)) and not isinstance(value, bool))
                 or (t in kinds and isinstance(value, kinds[t])) for t in types)
        if not ok:
            return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", -float("inf")) or value > schema.get("maximum", float("inf")):
            return False
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            return False
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return False
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            return False
        return all(validate(v, schema.get("items", {})) for v in value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and any(k not in props for k in value):
            return False
        return all(validate(v, props[k]) for k, v in value.items() if k in props)
    return True


# ----------------------------------------------------------------------------------------- adapters
class Adapter:
    """One library behind the same calls: build(tok) once, compile(kind) once per grammar, start(compiled) ->
    a fresh state (per walk), fill(state) computes the
    next mask in the library's own format (what is timed), read() -> its allowed ids (not timed: a list
    conversion only this bench needs), advance(state, token) -> bool."""
    name = ""
    module = ""

    def __init__(self):
        t = time.perf_counter()
        self.lib = importlib.import_module(self.module)
        self.import_s = time.perf_counter() - t

    def mask(self, state) -> list[int]:
        self.fill(state)
        return self.read()

    @staticmethod
    def bits(words, vocab: int) -> list[int]:
        import numpy as np

        return np.flatnonzero(np.unpackbits(np.asarray(words).view(np.uint8), bitorder="little")[:vocab]).tolist()


class LLGuidance(Adapter):
    name, module = "llguidance", "llguidance"

    def build(self, tok: Tokenizer) -> None:
        from llguidance.tiktoken import lltokenizer_from_encoding
        import llguidance.numpy as lnp

        self.tok, self.lnp = tok, lnp
        self.ll = lltokenizer_from_encoding(tok.enc, n_vocab=tok.vocab_size, eos_token=tok.special[END])
        self.buf = lnp.allocate_token_bitmask(1, tok.vocab_size)

    def grammar(self, kind: str) -> str:
        M = self.lib.LLMatcher
        opts = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
        if kind != "tool":
            return M.grammar_from_json_schema({"person": PERSON, "nested": NESTED, "any": ANY}[kind], overrides=opts)
        body = json.dumps({**TOOL_SCHEMA, "x-guidance": opts})
        sp = self.tok.special
        return M.grammar_from_lark(f'start: <[{sp[CALL_START]}]> "\\n" body "\\n" <[{sp[CALL_END]}]>\n'
                                   f"body: %json {body}\n")

    def compile(self, kind: str):
        m = self.lib.LLMatcher(self.ll, self.grammar(kind), log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def start(self, m):
        return m.deep_copy()

    def fill(self, m) -> None:
        self.lnp.fill_next_token_bitmask(m, self.buf, 0)

    def read(self) -> list[int]:
        return self.bits(self.buf[0], self.tok.vocab_size)

    def advance(self, m, token: int) -> bool:
        return m.consume_token(token)


class OutlinesCore(Adapter):
    """Regex (DFA) based: no recursion (json_object is approximated by the library's bounded regex) and no
    special-token terminals (the tool grammar is not expressible; only the JSON body is compiled)."""
    name, module = "outlines-core", "outlines_core"

    def build(self, tok: Tokenizer) -> None:
        import torch

        self.tok = tok
        vocab = {t: [r] for t, r in tok.mergeable_ranks.items()}
        self.vocab = self.lib.Vocabulary(tok.special[END], vocab)
        self.buf = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
        self.indexes: dict[str, object] = {}

    def compile(self, kind: str):
        schema = {"person": PERSON, "nested": NESTED, "any": ANY, "tool": TOOL_SCHEMA}[kind]
        regex = self.lib.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern=" ?")
        return self.lib.Index(regex, self.vocab)

    def start(self, index):
        return self.lib.Guide(index)

    def fill(self, g) -> None:
        self.buf.zero_()
        g.write_mask_into(self.buf.data_ptr(), self.buf.numel(), 4)

    def read(self) -> list[int]:
        return self.bits(self.buf.numpy(), self.tok.vocab_size)

    def advance(self, g, token: int) -> bool:
        try:
            g.advance(token, return_tokens=False)
            return True
        except Exception:  # noqa: BLE001 - the library raises on a token it does not allow
            return False


class XGrammar(Adapter):
    """Special tokens given as empty strings: xgrammar then treats them as special, never text, but also
    refuses them as grammar terminals (the tool grammar's markers)."""
    name, module = "xgrammar", "xgrammar"
    named_specials = False

    def build(self, tok: Tokenizer) -> None:
        x = self.lib
        self.tok = tok
        ranks = sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1])
        names = {i: name.encode() for name, i in tok.special.items()}
        vocab = [t for t, _ in ranks] + [names[i] if self.named_specials else b""
                                         for i in range(len(ranks), tok.vocab_size)]
        self.info = x.TokenizerInfo(vocab, x.VocabType.RAW, vocab_size=tok.vocab_size,
                                    stop_token_ids=[tok.special[END]])
        self.compiler = x.GrammarCompiler(self.info, cache_enabled=False)
        self.buf = x.allocate_token_bitmask(1, tok.vocab_size)

    def compile(self, kind: str):
        x, c = self.lib, self.compiler
        kw = dict(any_whitespace=False, separators=(", ", ": "))
        if kind == "any":
            g = c.compile_json_schema(ANY, **kw)
        elif kind == "tool":
            sp = self.tok.special
            g = c.compile_structural_tag({"type": "structural_tag", "format": {"type": "sequence", "elements": [
                {"type": "token", "token": sp[CALL_START]}, {"type": "const_string", "value": "\n"},
                {"type": "json_schema", "json_schema": TOOL_SCHEMA}, {"type": "const_string", "value": "\n"},
                {"type": "token", "token": sp[CALL_END]}]}})
        else:
            g = c.compile_json_schema({"person": PERSON, "nested": NESTED}[kind], **kw)
        return g

    def start(self, g):
        return self.lib.GrammarMatcher(g)

    def fill(self, m) -> None:
        m.fill_next_token_bitmask(self.buf)

    def read(self) -> list[int]:
        return self.bits(self.buf[0].numpy(), self.tok.vocab_size)

    def advance(self, m, token: int) -> bool:
        return m.accept_token(token)


class XGrammarNamed(XGrammar):
    """Special tokens given by their names: usable as terminals, but then they are text to xgrammar too, and
    may appear inside JSON strings (the check reports it)."""
    name = "xgrammar-named"
    named_specials = True


# ----------------------------------------------------------------------------------------- measuring
def closing_tokens(tok: Tokenizer) -> set[int]:
    return {r for t, r in tok.mergeable_ranks.items() if any(c in t for c in b'"}]') or t.strip().isdigit()}


def walk(ad: Adapter, state, tok: Tokenizer, rng: random.Random, steps: int, closing: set[int]):
    """One random walk; returns (token ids, finished, seconds spent in mask+advance, mask+advance count)."""
    end, out, spent, n = tok.special[END], [], 0.0, 0
    for _ in range(steps):
        t = time.perf_counter()
        ad.fill(state)
        spent += time.perf_counter() - t
        allowed = ad.read()
        if not allowed:
            return out, "empty mask", spent, n
        if end in allowed and (len(allowed) == 1 or rng.random() < 0.5):
            return out, "done", spent, n + 1
        near = [a for a in allowed if a in closing]
        pick = rng.choice(near if near and rng.random() < 0.6 else allowed)
        t = time.perf_counter()
        ok = ad.advance(state, pick)
        spent += time.perf_counter() - t
        n += 1
        if not ok:
            return out, "advance refused a masked token", spent, n
        out.append(pick)
    return out, "length", spent, n


def body_text(tok: Tokenizer, kind: str, ids: list[int]) -> str:
    """The JSON in a walk (for tool: between the markers)."""
    if kind == "tool":
        ids = [i for i in ids if not tok.is_special(i)]
    return tok.decode(ids).strip("\n")


def check(ad: Adapter, tok: Tokenizer, kind: str, compiled) -> list[str]:
    """Correctness problems of one grammar (empty list: none)."""
    problems = []
    sp = tok.special
    schema = {"person": PERSON, "nested": NESTED, "any": ANY, "tool": TOOL_SCHEMA}[kind]
    wrapped = kind == "tool" and ad.name != "outlines-core"
    for good in GOOD[kind]:
        text = json.dumps(good, ensure_ascii=False)
        ids = tok.encode(text)
        if wrapped:
            ids = [sp[CALL_START]] + tok.encode("\n" + text + "\n") + [sp[CALL_END]]
        st = ad.start(compiled)
        for i, t in enumerate(ids):
            allowed = ad.mask(st)
            if t not in allowed:
                problems.append(f"refused token {i} of valid {text[:40]!r}")
                break
            specials = {a for a in allowed if tok.is_special(a)} - {sp[END], sp[CALL_START], sp[CALL_END]}
            if specials:
                problems.append(f"allowed special tokens {sorted(specials)} inside {text[:40]!r}")
                break
            ad.advance(st, t)
        else:
            if sp[END] not in ad.mask(st):
                problems.append(f"no {END} after valid {text[:40]!r}")
    prefix, wrong = BAD[kind]
    st = ad.start(compiled)
    ids = ([sp[CALL_START]] + tok.encode("\n" + prefix) if wrapped else tok.encode(prefix))
    for t in ids:
        ad.mask(st)
        ad.advance(st, t)
    allowed = set(ad.mask(st))
    bad = [r for t, r in tok.mergeable_ranks.items() if t.startswith(wrong.encode())]
    if any(b in allowed for b in bad):
        problems.append(f"allowed {wrong!r} after {prefix!r}")
    return problems


def measure(ad: Adapter, tok: Tokenizer, kinds: list[str], walks: int, steps: int) -> dict:
    out: dict = {}
    t = time.perf_counter()
    ad.build(tok)
    out["tokenizer_s"] = time.perf_counter() - t
    closing = closing_tokens(tok)
    for kind in kinds:
        row: dict = {}
        try:
            best = float("inf")
            for _ in range(3):  # the best of 3: the shared machine's load only ever adds time
                t = time.perf_counter()
                compiled = ad.compile(kind)
                best = min(best, time.perf_counter() - t)
            row["compile_ms"] = best * 1e3
        except Exception as e:  # noqa: BLE001 - a grammar the library cannot express is a result too
            out[kind] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
            continue
        rng = random.Random(0)
        spent = n = finished = 0
        per_walk = []
        problems = []
        for _ in range(walks):
            ids, how, s, k = walk(ad, ad.start(compiled), tok, rng, steps, closing)
            spent, n = spent + s, n + k
            if k >= 10:
                per_walk.append(s / k)
            if how == "done":
                finished += 1
                try:
                    value = json.loads(body_text(tok, kind, ids))
                    if not validate(value, ANY if kind == "any" else
                                    {"person": PERSON, "nested": NESTED, "tool": TOOL_SCHEMA}[kind]):
                        problems.append(f"invalid: {body_text(tok, kind, ids)[:60]!r}")
                except ValueError:
                    problems.append(f"not JSON: {body_text(tok, kind, ids)[:60]!r}")
            elif how != "length":
                problems.append(how)
        problems += check(ad, tok, kind, compiled)
        # the best walk's mean (as other benches keep their best round): load on the shared machine only adds
        row.update(us_per_token=min(per_walk, default=spent / max(n, 1)) * 1e6, tokens=n,
                   finished=f"{finished}/{walks}",
                   problems=problems)
        out[kind] = row
    return out


def ours_us_per_token(tok: Tokenizer, rounds: int = 20) -> float | None:
    """What exocortex pays per constrained token with the library it uses (exocortex/infer/constrain.py):
    mask_logits (mask, unpack, masked_fill on a logits row) + advance, along json.dumps of valid instances."""
    try:
        import torch

        from exocortex.infer.constrain import json_schema_constraint, mask_logits
        base = json_schema_constraint(tok, NESTED)
    except Exception:  # noqa: BLE001 - llguidance missing: nothing to measure
        return None
    logits = torch.randn(tok.vocab_size)
    ids = tok.encode(json.dumps(GOOD["nested"][0]))
    best = float("inf")
    for _ in range(rounds):
        c = base.fork()
        t = time.perf_counter()
        for i in ids:
            mask_logits(logits, c)
            c.advance(i)
        best = min(best, time.perf_counter() - t)
    return best / len(ids) * 1e6


def installed_mb(dist_name: str, base: set[str], seen: set[str] | None = None) -> float:
    """Installed size of a package and of its requirements that are not already exocortex's."""
    seen = set() if seen is None else seen
    key = re.sub(r"[-_.]+", "-", dist_name).lower()
    if key in seen or key in base:
        return 0.0
    seen.add(key)
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return 0.0
    size = sum((f.size or 0) for f in dist.files or [])
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        try:
            from packaging.requirements import Requirement

            r = Requirement(req)
            if r.marker is not None and not r.marker.evaluate():
                continue
            name = r.name
        except Exception:  # noqa: BLE001 - packaging missing: take the name before any version or marker
            name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]
        size += installed_mb(name, base, seen) * 1e6
    return size / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--walks", type=int, default=12)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    kinds = ["person", "nested", "any", "tool"]
    base = {re.sub(r"[-_.]+", "-", re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]).lower()
            for r in md.distribution("exocortex").requires or [] if "extra ==" not in r} if _has("exocortex") else set()
    libs = []
    for cls, dist in ((LLGuidance, "llguidance"), (OutlinesCore, "outlines-core"), (XGrammar, "xgrammar"),
                      (XGrammarNamed, "xgrammar")):
        try:
            ad = cls()
        except ImportError as e:
            print(f"[{cls.name}] not installed ({e}); skipped", flush=True)
            continue
        ad.install_mb = installed_mb(dist, base)
        libs.append(ad)
    t = time.perf_counter()
    docs = corpus(16_000_000 if max(args.vocab) > 8192 else 4_000_000)
    toks = {v: Tokenizer.train(docs, v) for v in args.vocab}
    print(f"tokenizers trained in {time.perf_counter() - t:.1f} s: "
          + ", ".join(f"{v} -> {tok.vocab_size}" for v, tok in toks.items()), flush=True)
    results: dict = {}
    ours = {v: ours_us_per_token(tok) for v, tok in toks.items()}
    for ad in libs:
        results[ad.name] = {"import_s": round(ad.import_s, 3), "install_mb": round(ad.install_mb, 1)}
        for v, tok in toks.items():
            results[ad.name][v] = measure(ad, tok, kinds, args.walks, args.steps)
            print(f"[{ad.name}] vocab {v} measured", flush=True)

    print(f"\n{'library':>14} {'MB':>6} {'import':>7} {'vocab':>6} {'tok s':>6} "
          + " ".join(f"{k + ' ms':>9} {k + ' us/t':>10}" for k in kinds) + "  problems")
    summary: dict = {}
    for name, r in results.items():
        for v in args.vocab:
            m = r[v]
            cells, problems = [], []
            for k in kinds:
                if "error" in m[k]:
                    cells.append(f"{'n/a':>9} {'n/a':>10}")
                    problems.append(f"{k}: {m[k]['error']}")
                    continue
                cells.append(f"{m[k]['compile_ms']:9.1f} {m[k]['us_per_token']:10.1f}")
                if m[k]["problems"]:  # how many, and the first of each kind of problem
                    seen = {}
                    for p in m[k]["problems"]:
                        seen.setdefault(p.split(":")[0], p)
                    problems.append(f"{k} x{len(m[k]['problems'])}: " + " | ".join(seen.values()))
                summary[f"{name}_{v}_{k}_compile_ms"] = round(m[k]["compile_ms"], 2)
                summary[f"{name}_{v}_{k}_us_per_token"] = round(m[k]["us_per_token"], 1)
            summary[f"{name}_{v}_problems"] = len(problems)
            print(f"{name:>14} {r['install_mb']:6.0f} {r['import_s']:7.2f} {v:6d} {m['tokenizer_s']:6.2f} "
                  + " ".join(cells) + "  " + ("; ".join(problems) or "none"))
            summary[f"{name}_{v}_tokenizer_s"] = round(m["tokenizer_s"], 3)
        summary[f"{name}_install_mb"] = r["install_mb"]
        summary[f"{name}_import_s"] = r["import_s"]
    for v, us in ours.items():
        if us is not None:
            print(f"exocortex Constraint (llguidance) at vocab {v}: {us:.1f} us per token "
                  "(mask_logits + advance, nested schema)")
            summary[f"exocortex_{v}_us_per_token"] = round(us, 1)
    print(json.dumps(summary))


def _has(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
