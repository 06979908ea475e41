"""Run a benchmark case: ``python -m launch.benchmark CASE [case args] [--out=FILE]``.

A case is a module ``defi_jax/benchmarks/<CASE>.py`` with ``run(args: list[str]) -> list[dict]``. The rows
are printed as a table and appended, each with a UTC timestamp, to ``benchmark_results.json`` (or FILE, local
or gs://).
``python -m launch.benchmark --list`` names the cases.
"""

import datetime
import importlib
import json
import os
import pkgutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow (the data case)


def cases() -> list[str]:
    import defi_jax.benchmarks as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths))
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def main(argv: list[str]) -> int:
    out = "benchmark_results.json"
    args = []
    for a in argv:
        if a.startswith("--out="):
            out = a.split("=", 1)[1]
        else:
            args.append(a)
    if not args or args[0] in ("-h", "--help", "--list"):
        print(__doc__.strip() + "\n\ncases: " + ", ".join(cases()))
        return 0 if args else 2
    case, case_args = args[0], args[1:]
    if case not in cases():
        print(f"unknown benchmark case {case!r}; cases: {', '.join(cases())}", file=sys.stderr)
        return 2
    from defi_jax import paths
    out = paths.abspath(out)
    print(f"launch.benchmark: {case} {' '.join(case_args)}".rstrip() + f" -> {out}", flush=True)
    rows = importlib.import_module(f"defi_jax.benchmarks.{case}").run(case_args)
    print(table(rows))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    previous = json.loads(paths.read_text(out)) if paths.exists(out) else []
    paths.write_text(out, json.dumps(previous + [dict(r, timestamp=stamp) for r in rows], indent=1))
    print(f"appended {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
