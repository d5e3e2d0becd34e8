"""`make mutation`: mutmut over ssam.py against the fast ssam tests ([tool.mutmut] in pyproject.toml),
then the score and the survivors. Not part of `make test`.

mutmut 3 leaves every decorated function unmutated, and ssam.py keeps much of its core under decorators
(first_step and update_mask under @torch.no_grad(), empirical_fisher under @torch.enable_grad(), the context
managers, a property). Two small patches, applied in this process before mutmut forks, let it mutate them:
  - a function whose decorators are all of the kinds below is mutated like an undecorated one;
  - the trampoline that picks the active mutant keeps the decorators, and the copies it switches between (the
    original and each mutant) are plain functions, so a decorator is applied once: @contextmanager and
    @property keep working (mutmut keeps @staticmethod on the copies, as it does without this script).
Usage: python scripts/mutation.py [--list-only] [--sample N] [--seed S] [--out FILE]
  --sample N: run N mutants drawn with --seed (default 0) instead of all of them; --list-only: report only.
"""

import argparse
import hashlib
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import libcst as cst
import mutmut.__main__ as mm
from mutmut.mutation import file_mutation as fm

ROOT = Path(__file__).resolve().parent.parent
DECORATORS = {"torch.no_grad()", "torch.enable_grad()", "contextmanager", "property", "staticmethod"}
KEEP_ON_COPIES = {"staticmethod", "classmethod"}


def _code(decorator):
    return cst.Module([]).code_for_node(decorator.decorator)


def _ours(node):
    return (
        isinstance(node, cst.FunctionDef)
        and node.decorators
        and {_code(d) for d in node.decorators} <= DECORATORS
    )


_skip = fm.MutationVisitor._skip_node_and_children


def _skip_node_and_children(self, node):
    # judged as if undecorated (the pragma lookup by position is lost for the `def` line: ssam.py has none)
    return _skip(self, node.with_changes(decorators=()) if _ours(node) else node)


_arrange = fm.function_trampoline_arrangement


def function_trampoline_arrangement(function, mutants, class_name):
    empty, nodes, assign, names = _arrange(function, mutants, class_name)
    if _ours(function):  # nodes: the trampoline (decorated), then the original's copy and the mutants
        keep = [d for d in function.decorators if _code(d) in KEEP_ON_COPIES]
        nodes = [nodes[0]] + [n.with_changes(decorators=keep) for n in nodes[1:]]
    return empty, nodes, assign, names


fm.MutationVisitor._skip_node_and_children = _skip_node_and_children
fm.function_trampoline_arrangement = function_trampoline_arrangement


def results():
    """{mutant name: status} from mutmut's result files."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=ROOT,
        text=True,
        capture_output=True,
        check=True,
    ).stdout
    return dict(re.findall(r"^\s+(\S+): (.+)$", out, re.M))


def show(name):
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name], cwd=ROOT, text=True, capture_output=True
    )
    return "\n".join(
        line for line in out.stdout.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=0, help="run this many mutants, drawn with --seed (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list-only", action="store_true", help="only print the last run's score and survivors")
    ap.add_argument("--out", default="", help="also write the survivors as markdown here")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    start = time.time()
    if not args.list_only:
        names = ()
        if args.sample:
            mm._run((), 1) if not Path("mutants").exists() else None  # generate, to know the names
            everything = sorted(results())
            names = tuple(random.Random(args.seed).sample(everything, min(args.sample, len(everything))))
        mm._run(names, 1)
    status = results()
    counts = {s: sum(v == s for v in status.values()) for s in sorted(set(status.values()))}
    tried = sum(n for s, n in counts.items() if s not in ("not checked",))
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    print(
        f"\nmutation score: {killed}/{tried} killed ({', '.join(f'{n} {s}' for s, n in counts.items())}); "
        f"{time.time() - start:.0f} s"
    )
    survivors = sorted(k for k, v in status.items() if v not in ("killed", "timeout", "not checked"))
    for name in survivors:
        print(f"\n{name} ({status[name]})\n{show(name)}")
    if args.out:
        blob = subprocess.run(
            ["git", "hash-object", "ssam.py"], text=True, capture_output=True
        ).stdout.strip()
        sha = hashlib.sha256(Path("ssam.py").read_bytes()).hexdigest()[:12]
        lines = [f"ssam.py blob {blob} (sha256 {sha}): {killed}/{tried} killed", ""]
        lines += [f"- `{n}` ({status[n]})" for n in survivors]
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
