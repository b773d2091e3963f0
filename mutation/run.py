"""Mutation harness: plant each mutant of ``mutants.py`` in a temporary copy of the repository
and measure whether ``refflow verify --quick``, ``refflow verify`` and the tests kill it.

Usage::

    python mutation/run.py                      # every mutant, verify quick + full, related tests
    python mutation/run.py --only targets,cnf-  # mutants whose id contains one of the words
    python mutation/run.py --no-tests           # verify only
    python mutation/run.py --tests all          # the whole suite (-x) for each mutant

The working tree is never modified: refflow/, tests/, verification/, docs/ and
pyproject.toml are copied once to a temporary directory; each mutant edits one
file there, runs, and the pristine file is copied back (with its timestamp, so
Numba's cache of the unmutated kernels stays valid).  A mutant is *killed* by
verify when any check fails (a check that raises counts as failing); the checks
of the mutated module run first and the run stops at the first failure.  Quick
checks are a subset of the full ones, so a mutant killed by ``--quick`` is
killed by the full run too; the full run only adds the non-quick checks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from mutants import MUTANTS  # noqa: E402

COPY = ["refflow", "tests", "verification", "docs", "pyproject.toml", "README.md", "benchmarks", "mutation"]

# check-name prefixes and test files that belong to each mutated file
RELATED = {
    "refflow/paths.py": (["paths."], ["tests/test_paths.py"]),
    "refflow/targets.py": (["targets."], ["tests/test_targets.py"]),
    "refflow/losses.py": (["gradients.", "train."], ["tests/test_gradients.py", "tests/test_train.py"]),
    "refflow/solvers.py": (["solvers.", "guidance."], ["tests/test_solvers.py"]),
    "refflow/cnf.py": (["cnf."], ["tests/test_cnf.py"]),
    "refflow/flows.py": (["flows."], ["tests/test_flows.py"]),
    "refflow/gradients.py": (["gradients."], ["tests/test_gradients.py"]),
    "refflow/nn/_kernels.py": (["nn."], ["tests/test_nn.py", "tests/test_backend.py"]),
    "refflow/nn/mlp.py": (["nn."], ["tests/test_nn.py"]),
    "refflow/train.py": (["train."], ["tests/test_train.py"]),
    "refflow/stats.py": ([], ["tests/test_validate.py"]),
    "refflow/validate/field.py": (["validate"], ["tests/test_validate.py", "tests/test_bug_zoo.py"]),
    "refflow/validate/guided.py": (["validate"], ["tests/test_validate.py", "tests/test_bug_zoo.py"]),
}


def apply(text: str, old: str, new: str) -> str:
    lines = text.split("\n")
    hits = [i for i, line in enumerate(lines) if line.strip() == old.strip()]
    if len(hits) != 1:
        raise LookupError(f"old line found {len(hits)} times")
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = indent + new.strip()
    return "\n".join(lines)


def run(cmd, cwd, env, timeout):
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        return None, "", "timeout", time.perf_counter() - start


def verify(mode, first, cwd, env, timeout):
    rc, out, err, secs = run([sys.executable, os.path.join(cwd, "mutation", "_driver.py"), mode, ",".join(first)],
                             cwd, env, timeout)
    if rc is None:
        return "timeout", secs
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if rc != 0 or not lines:
        return "crash: " + (err.strip().splitlines() or ["?"])[-1][:200], secs
    res = json.loads(lines[-1])
    if not res["file"].startswith(cwd):
        raise RuntimeError(f"the copy was not imported: {res['file']}")
    return res["killed_by"], secs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated words; run mutants whose id contains one")
    ap.add_argument("--tests", choices=["none", "related", "all"], default="related")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-full", action="store_true", help="verify --quick only")
    ap.add_argument("--no-verify", action="store_true", help="the tests only")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--skip-baseline", action="store_true", help="do not first check the unmutated copy")
    ap.add_argument("--json", help="write the per-mutant results here")
    args = ap.parse_args(argv)
    tests_mode = "none" if args.no_tests else args.tests
    mutants = MUTANTS
    if args.only:
        words = [w for w in args.only.split(",") if w]
        mutants = [m for m in MUTANTS if any(w in m[0] for w in words)]

    tmp = tempfile.mkdtemp(prefix="refflow-mutation-")
    repo = os.path.join(tmp, "repo")
    os.makedirs(repo)
    for item in COPY:
        src = os.path.join(ROOT, item)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(repo, item), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif os.path.exists(src):
            shutil.copy2(src, os.path.join(repo, item))
    pristine = os.path.join(tmp, "pristine")
    shutil.copytree(os.path.join(repo, "refflow"), pristine)
    env = dict(os.environ, PYTHONPATH=repo, NUMBA_CACHE_DIR=os.path.join(tmp, "numba"),
               PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    print(f"copy in {repo}; {len(mutants)} mutants", flush=True)
    if not (args.skip_baseline or args.no_verify):
        # the unmutated copy must pass, or every "kill" below would be the copy's own failure
        for mode in ("quick",) if args.no_full else ("quick", "rest"):
            killed, secs = verify(mode, [], repo, env, args.timeout)
            if killed is not None:
                sys.exit(f"the unmutated copy fails verify ({mode}): {killed}; fix that first")
        print("unmutated copy passes", flush=True)

    results = []
    for mid, file, old, new, what in mutants:
        target = os.path.join(repo, file)
        original = os.path.join(pristine, os.path.relpath(file, "refflow"))
        row = {"id": mid, "file": file, "what": what}
        try:
            text = open(original).read()
            mutated = apply(text, old, new)
            compile(mutated, file, "exec")
        except (LookupError, SyntaxError, OSError) as exc:
            row["status"] = f"invalid ({exc})"
            print(f"{mid:40s} INVALID {exc}", flush=True)
            results.append(row)
            continue
        first, test_files = RELATED.get(file, ([], []))
        try:
            with open(target, "w") as fh:
                fh.write(mutated)
            row["quick"], t_q = (None, 0.0) if args.no_verify else verify("quick", first, repo, env, args.timeout)
            row["full"], t_f = row["quick"], 0.0
            if row["quick"] is None and not (args.no_full or args.no_verify):
                # the full run adds the non-quick checks; quick ones already passed
                row["full"], t_f = verify("rest", first, repo, env, args.timeout)
            row["tests"] = None
            t_t = 0.0
            if tests_mode != "none":
                files = test_files if tests_mode == "related" else ["tests"]
                files = [f for f in files if os.path.exists(os.path.join(repo, f))]
                rc, out, err, t_t = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                         *files], repo, env, args.timeout)
                last = (out.strip().splitlines() or ["?"])[-1]
                row["tests"] = None if rc == 0 else (last[:200] or "failed")
                if rc == 5:  # no tests collected
                    row["tests"] = None
        finally:
            shutil.copy2(original, target)
        row["seconds"] = round(t_q + t_f + t_t, 1)
        flag = lambda v: "." if v is None else "K"  # noqa: E731
        print(f"{mid:40s} quick {flag(row['quick'])} full {flag(row['full'])} tests {flag(row['tests'])}"
              f"  {row['seconds']:6.1f}s  {row['quick'] or row['full'] or ''}", flush=True)
        results.append(row)

    valid = [r for r in results if "status" not in r]
    n = len(valid)

    def rate(key):
        return sum(r.get(key) is not None for r in valid)

    print()
    print(f"valid mutants: {n} (invalid: {len(results) - n})")
    if n and not args.no_verify:
        q, f = rate("quick"), rate("full")
        print(f"refflow verify --quick kills {q}/{n} = {100 * q / n:.1f}%")
        print(f"refflow verify (full)  kills {f}/{n} = {100 * f / n:.1f}%")
    if n and tests_mode != "none":
        t = rate("tests")
        both = sum(r.get("full") is not None or r.get("tests") is not None for r in valid)
        print(f"tests ({tests_mode})        kill {t}/{n} = {100 * t / n:.1f}%")
        if not args.no_verify:
            print(f"verify + tests         kill {both}/{n} = {100 * both / n:.1f}%")
        surv_t = [r for r in valid if r.get("tests") is None]
        print("survivors of the tests:", ", ".join(r["id"] for r in surv_t) or "none")
    if n and not args.no_verify:
        surv = [r for r in valid if r.get("full") is None]
        print("survivors of verify (full):", ", ".join(r["id"] for r in surv) or "none")
        surv_q = [r for r in valid if r.get("quick") is None]
        print("survivors of verify --quick:", ", ".join(r["id"] for r in surv_q) or "none")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
