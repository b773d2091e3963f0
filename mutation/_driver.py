"""Run registered checks in a given order and stop at the first failure (used by run.py).

Invoked inside the temporary copy of the repository, with that copy first on
``PYTHONPATH``.  Prints one JSON line: ``{"killed_by": name or null, "ran": [...]}``.
"""
import json
import sys


def main():
    import refflow
    from refflow.verify.registry import registered, run_check

    mode = sys.argv[1]  # "quick": the --quick checks; "rest": the checks only the full run adds
    quick = mode == "quick"
    first = [p for p in sys.argv[2].split(",") if p]
    entries = registered(quick=True) if quick else [e for e in registered() if not e.quick]
    # the checks of the mutated module first: a kill there ends the run soonest
    entries.sort(key=lambda e: 0 if any(e.name.startswith(p) for p in first) else 1)
    ran = []
    for entry in entries:
        result = run_check(entry, quick=quick)
        ran.append(entry.name)
        if not result.passed:
            print(json.dumps({"killed_by": entry.name, "why": result.message[:300], "ran": ran,
                              "file": refflow.__file__}))
            return
    print(json.dumps({"killed_by": None, "ran": ran, "file": refflow.__file__}))


if __name__ == "__main__":
    main()
