"""Two closed-loop evaluations of one protocol compared episode by episode (``launch.evaluate`` outputs).

    python -m launch.compare_evals --a=/tmp/eval_full --b=/tmp/eval_no_gfdm
    python -m launch.compare_evals --a=gs://bucket/eval_a/summary.json --b=/tmp/eval_b --out=/tmp/a_vs_b.csv

    # one pair per fine-tuning seed, pooled (seed 0's evaluations, then seed 1's, ...):
    python -m launch.compare_evals --a=/tmp/full_s0,/tmp/full_s1 --b=/tmp/no_gfdm_s0,/tmp/no_gfdm_s1

``--a`` / ``--b``: an evaluation's ``--out`` folder or its ``summary.json`` (local or ``gs://``); several,
comma-separated, pair up in order: each pair is compared as below and its overall row printed, then the table
pooled over the pairs (a discordant episode of any pair counts once). Episode e of a task
has the same env seed and goal in both, and, with the policy's noise seeded per episode (every evaluation since
per-row seeds; ``protocol.policy_noise``), the same noise, so the episodes only one policy solved carry the
comparison: per task and overall it prints both success counts, those discordant episodes and the exact McNemar
p-value (two-sided), over the tasks and episodes both ran. Evaluations of different protocols (horizon, chunking,
seed, resolution, cameras; also task lists, episode counts and workers when the noise was not seeded per row) are
refused with the keys that differ. ``--out`` also writes the table as CSV (atomically).
"""

import json
import sys

from absl import app, flags

from defi_jax import paths

_A = flags.DEFINE_list("a", None, "First evaluation: its output folder or summary.json (local or gs://); several, "
                       "comma-separated, pair up in order with --b's and are pooled.")
_B = flags.DEFINE_list("b", None, "Second evaluation, the same protocol (as many as --a).")
_OUT = flags.DEFINE_string("out", None, "Also write the table as CSV here (local or gs://).")
flags.mark_flags_as_required(["a", "b"])


def _load(path: str) -> dict:
    file = path if path.endswith(".json") else paths.join(path, "summary.json")
    if not paths.exists(file):
        raise SystemExit(f"launch.compare_evals: {file}: no such file (give a launch.evaluate --out folder or its "
                         f"summary.json)")
    try:
        summary = json.loads(paths.read_text(file))
    except json.JSONDecodeError as e:
        raise SystemExit(f"launch.compare_evals: {file}: not JSON ({e})") from e
    if "protocol" not in summary or "episodes" not in summary:
        raise SystemExit(f"launch.compare_evals: {file}: not a launch.evaluate summary (no 'protocol' / 'episodes')")
    return summary


def _table(rows: dict, label=None) -> list[tuple]:
    return [((label,) if label else ()) + (t, r["episodes"], r["a_successes"], r["b_successes"], r["only_a"],
                                           r["only_b"], f"{r['mcnemar_p']:.3g}") for t, r in rows.items()]


def _print(head: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def main(argv):
    del argv
    from defi_jax.evaluation import metaworld

    if len(_A.value) != len(_B.value):
        raise SystemExit(f"launch.compare_evals: --a names {len(_A.value)} evaluation(s), --b {len(_B.value)}: "
                         "they pair up in order")
    pairs = [(_load(a), _load(b)) for a, b in zip(_A.value, _B.value)]
    try:
        result = metaworld.compare(*pairs[0]) if len(pairs) == 1 else metaworld.compare_pooled(pairs)
    except ValueError as e:
        raise SystemExit(f"launch.compare_evals: {e}") from e
    head = ("task", "episodes", "a", "b", "only_a", "only_b", "mcnemar_p")
    noise = "policy noise: " + ("shared per episode" if result["shared_noise"] else
                                "NOT shared (an evaluation before per-row seeds): only env seeds and goals are paired")
    if len(pairs) == 1:
        print(f"a: {_A.value[0]}\nb: {_B.value[0]}\n{noise}")
        rows = _table(result["tasks"])
        _print(head, rows)
    else:   # each pair's overall row, then the pooled table; the CSV holds every pair's rows and the pooled ones
        for i, (a, b) in enumerate(zip(_A.value, _B.value)):
            print(f"pair {i + 1}: a: {a}\n        b: {b}")
        print(noise)
        head = ("pair",) + head
        _print(head, [_table(r, str(i + 1))[-1] for i, r in enumerate(result["pairs"])])
        print(f"pooled over the {len(pairs)} pairs:")
        pooled = _table(result["tasks"], "pooled")
        _print(head, pooled)
        rows = [row for i, r in enumerate(result["pairs"]) for row in _table(r, str(i + 1))] + pooled
    if _OUT.value:
        text = "\n".join(",".join(str(x) for x in row) for row in (head, *rows)) + "\n"
        paths.write_text(_OUT.value, text)
        print(f"launch.compare_evals: table written to {_OUT.value}")


if __name__ == "__main__":
    from defi_jax import config_validation
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
