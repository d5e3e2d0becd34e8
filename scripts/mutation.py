"""`make mutation`: mutmut over ssam.py against the fast ssam tests ([tool.mutmut] in pyproject.toml),
then the score and the survivors. Not part of `make test`.

mutmut 3 leaves every decorated function unmutated, and ssam.py keeps much of its core under decorators
(first_step and update_mask under @torch.no_grad(), empirical_fisher under @torch.enable_grad(), the context
managers, a property). Two small patches, applied in this process before mutmut forks, let it mutate them:
  - a function whose decorators are all of the kinds below is mutated like an undecorated one;
  - the trampoline that picks the active mutant keeps the decorators, and the copies it switches between (the
    original and each mutant) are plain functions, so a decorator is applied once: @contextmanager and
    @property keep working (mutmut keeps @staticmethod on the copies, as it does without this script).
Usage: python scripts/mutation.py [--list-only]: a fresh run of every mutant (one worker), then the score,
the survivors with their diffs, and bench/results/mutation-survivors.md (--list-only: only the report).
"""

import argparse
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import libcst as cst
import mutmut.__main__ as mm
from mutmut.mutation import file_mutation as fm
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

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


OUT = ROOT / "bench" / "results" / "mutation-survivors.md"
TODO = "TODO: a new survivor: kill it with a test, or say why it is equivalent"


def statuses():
    """{mutant name: status} of the last run, from mutmut's result file for ssam.py."""
    data = SourceFileMutationData(path=Path("ssam.py"))
    data.load()
    return {k.rpartition(".")[2]: status_by_exit_code[v] for k, v in data.exit_code_by_key.items()}


def diff(name):
    """The changed lines of mutant `name` ('-' the original, '+' the mutant)."""
    text = get_diff_for_mutant(f"ssam.{name}", path=Path("ssam.py"))
    return [line for line in text.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def old_reasons():
    """{diff text: reason} from the committed list: reasons follow a survivor when its number changes."""
    if not OUT.exists():
        return {}
    found = re.findall(r"^reason: ([^\n]*)\n```diff\n(.*?)\n```", OUT.read_text(), re.M | re.S)
    return {d: r for r, d in found}


def write_list(status, score, seconds):
    reasons, survivors = (
        old_reasons(),
        [n for n, s in sorted(status.items()) if s not in ("killed", "timeout")],
    )
    blob = subprocess.run(["git", "hash-object", "ssam.py"], text=True, capture_output=True).stdout.strip()
    lines = [
        "# ssam.py's surviving mutants (`make mutation`)",
        "",
        f"Against ssam.py blob {blob} (`git hash-object ssam.py`): {score}, {seconds / 60:.0f} min",
        "on the dev machine. Each survivor with why it may stay; `make mutation` rewrites this file, keeping",
        "each reason whose mutant (the diff) is still there.",
        "",
    ]
    why = [reasons.get("\n".join(diff(n)), TODO) for n in survivors]
    kinds = {k: sum(w.startswith(k) for w in why) for k in ("message text", "device placement", "CUDA-only")}
    kinds["tested outside this run's selection"] = sum("outside this run's selection" in w for w in why)
    kinds["equivalent (each said below)"] = len(why) - sum(kinds.values())
    lines += ["Why they stay: " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ".", ""]
    for name in survivors:
        d = "\n".join(diff(name))
        lines += [f"## {name} ({status[name]})", f"reason: {reasons.get(d, TODO)}", "```diff", d, "```", ""]
    OUT.write_text("\n".join(lines))
    return sum(reasons.get("\n".join(diff(n)), TODO) == TODO for n in survivors)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list-only", action="store_true", help="no run: the last run's score and survivors")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    start = time.time()
    if not args.list_only:
        shutil.rmtree("mutants", ignore_errors=True)  # a fresh run: mutmut keeps old results otherwise
        mm._run((), 1)  # one worker: the machine is shared
    status = statuses()
    counts = {s: sum(v == s for v in status.values()) for s in sorted(set(status.values()))}
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    score = f"{killed}/{len(status)} mutants killed ({', '.join(f'{n} {s}' for s, n in counts.items())})"
    print(f"\nmutation score: {score}; {time.time() - start:.0f} s")
    for name, s in sorted(status.items()):
        if s not in ("killed", "timeout"):
            print(f"\n{name} ({s})\n" + "\n".join(diff(name)))
    if not args.list_only:
        todo = write_list(status, score, time.time() - start)
        print(f"\n{OUT.relative_to(ROOT)} written: {todo} survivors without a reason yet")


if __name__ == "__main__":
    main()
