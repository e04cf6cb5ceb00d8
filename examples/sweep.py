"""The paper's comparison: the same fine-tune-and-prune recipe for several patterns and sparsities.

    python examples/sweep.py                                   # every pattern at 50/75/90%
    python examples/sweep.py --patterns tw2d,bw --sparsities 0.75 --epochs 2
    python examples/sweep.py --report-only                     # redraw table and plot
    # distil every pruned run from a dense run saved with --save-params (its row is the dense one):
    python examples/train_bert_flax.py --pattern dense --epochs 3 --save-params --out-dir runs/dense
    python examples/sweep.py --teacher runs/dense

Each run is ``train_bert_flax.py`` with the given pattern and sparsity (other flags after
``--`` go to every run). Results accumulate in ``<out>/sweep.json`` (a run already there with
the same settings is skipped, so an interrupted sweep resumes); ``sweep.md`` (a table) and
``sweep.png`` (test accuracy vs sparsity per pattern, the dense fine-tune as a line) are redrawn
after every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_bert_flax  # noqa: E402

LABELS = {"dense": "dense", "ew": "EW", "vw": "VW", "bw": "BW", "tw1d": "TW-1D", "tw2d": "TW-2D",
          "tew": "TEW"}


def score_of(r: dict) -> str:
    """The run's importance score ('-' for dense); runs from before results.json recorded it
    used magnitude."""
    return "-" if r["pattern"] == "dense" else r.get("score") or "magnitude"


def recipe_of(r: dict) -> str:
    """The score, and whether the run distilled a teacher."""
    if r.get("is_teacher"):
        return "fine-tune (the teacher)"
    return score_of(r) + (" + teacher" if r.get("teacher") else "")


def run_key(r: dict) -> tuple:
    return (r["pattern"], round(r["target_sparsity"], 4), r["tile_size"], r["epochs"], r["seed"],
            score_of(r), r.get("teacher"), tuple(r.get("extra_args", [])))


def load_teacher(teacher: Path, seed: int) -> dict:
    """The saved dense run's results, as the sweep's dense row."""
    saved = teacher / "results.json"
    if not saved.is_file() or not (teacher / "params.safetensors").is_file():
        raise SystemExit(f"--teacher {teacher}: expected results.json and params.safetensors there "
                         "(a run of train_bert_flax.py --pattern dense --save-params)")
    r = json.loads(saved.read_text())
    if r["pattern"] != "dense" or r["seed"] != seed:
        raise SystemExit(f"--teacher {teacher}: expected a dense run with --seed {seed}, got pattern "
                         f"{r['pattern']!r} with --seed {r['seed']}")
    r.pop("layer_sparsity", None)
    r["is_teacher"] = True
    r["command"] = (f"teacher: {teacher} (train_bert_flax.py --pattern dense --epochs {r['epochs']:g} "
                    f"--seed {seed} --save-params)")
    return r


def write_report(results: list[dict], out: Path) -> None:
    """sweep.md and sweep.png from the results."""
    results = sorted(results, key=lambda r: (list(LABELS).index(r["pattern"]), r["target_sparsity"]))
    lines = ["| pattern | target | measured sparsity | G | epochs | recipe | dev acc | test acc | "
             "packed vs dense inference | run time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {LABELS[r['pattern']]} | {r['target_sparsity']:.0%} | {r['sparsity']:.2%} | "
            f"{r['tile_size']} | {r['epochs']:g} | {recipe_of(r)} | "
            f"{r['dev_accuracy']:.2%} | {r['test_accuracy']:.2%} | "
            f"{r['packed_speedup']:.2f}x | {r['total_seconds'] / 60:.1f} min |")
    commands = sorted({r["command"] for r in results})
    minutes = sum(r["total_seconds"] for r in results) / 60
    text = ("# Rotten Tomatoes polarity, all-MiniLM-L6-v2, pruned while fine-tuning\n\n"
            "Sparsity is over the 36 pruned encoder matrices (Q, K, V, attention-out, FFN1, FFN2 of "
            "6 layers). Accuracy on the fixed seeded dev/test splits (1,057 sentences each). "
            "Packed vs dense inference: the packed model against the same encoder built from "
            "nn.Dense, 64 sentences x 64 tokens, median of 5 interleaved repeats on this machine."
            + (" Runs marked `+ teacher` start from the dense row's fine-tuned model and distil its "
               "predictions (`--teacher`)." if any(r.get("teacher") for r in results) else "") + "\n\n"
            + "\n".join(lines) + f"\n\n{len(results)} runs, {minutes:.0f} min in all. Produced by:\n\n"
            + "\n".join(f"    {c}" for c in commands) + "\n")
    (out / "sweep.md").write_text(text)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for pattern, label in LABELS.items():
        rows = [r for r in results if r["pattern"] == pattern]
        if not rows:
            continue
        if pattern == "dense":
            acc = sum(r["test_accuracy"] for r in rows) / len(rows)
            ax.axhline(100 * acc, color="black", ls="--", lw=1, label=f"dense ({100 * acc:.1f}%)")
        else:
            ax.plot([100 * r["target_sparsity"] for r in rows], [100 * r["test_accuracy"] for r in rows],
                    marker="o", label=label)
    ax.set_xlabel("sparsity of the pruned layers (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2 on Rotten Tomatoes sentences")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", default="dense,tw2d,tew,tw1d,bw,vw,ew")
    ap.add_argument("--sparsities", default="0.5,0.75,0.9")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--tile-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", type=Path, default=None,
                    help="a dense run saved with --save-params and the same --seed: every pruned run "
                         "distils it, and it is the table's dense row")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "sweep.json"
    results = json.loads(store.read_text()) if store.exists() else []
    if args.report_only:
        write_report(results, args.out)
        return results
    done = {run_key(r) for r in results}
    teacher_flags = [] if args.teacher is None else ["--teacher", str(args.teacher)]
    if teacher_flags:  # its results are the dense row
        row = load_teacher(args.teacher, args.seed)
        if run_key(row) not in done:
            results.append(row)
            done.add(run_key(row))
            store.write_text(json.dumps(results, indent=1) + "\n")
    for pattern in args.patterns.split(","):
        if pattern == "dense" and teacher_flags:
            continue
        for sparsity in ([0.0] if pattern == "dense" else [float(s) for s in args.sparsities.split(",")]):
            run = ["--pattern", pattern, "--sparsity", str(sparsity), "--epochs", str(args.epochs),
                   "--tile-size", str(args.tile_size), "--seed", str(args.seed),
                   "--out-dir", str(args.out / "runs" / f"{pattern}-{sparsity:g}"), *teacher_flags, *extra]
            flags = train_bert_flax.parse_args(run)
            key = run_key({"pattern": pattern, "target_sparsity": sparsity, "tile_size": args.tile_size,
                           "epochs": args.epochs, "seed": args.seed, "extra_args": extra,
                           "score": flags.score, "teacher": flags.teacher and str(flags.teacher)})
            if key in done:
                print(f"skip {pattern} at {sparsity:.0%}: already in {store}")
                continue
            print(f"== {pattern} at {sparsity:.0%}", flush=True)
            started = time.perf_counter()
            r = train_bert_flax.main(run + ["--quiet"])
            r.pop("layer_sparsity")
            r["extra_args"] = extra
            r["command"] = ("python examples/sweep.py " + " ".join(
                ["--patterns", args.patterns, "--sparsities", args.sparsities, "--epochs", str(args.epochs),
                 "--tile-size", str(args.tile_size), "--seed", str(args.seed), *teacher_flags]
                + (["--", *extra] if extra else [])))
            print(f"   test accuracy {r['test_accuracy']:.2%}, sparsity {r['sparsity']:.2%}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            results.append(r)
            store.write_text(json.dumps(results, indent=1) + "\n")
            write_report(results, args.out)
    return results


if __name__ == "__main__":
    main()
