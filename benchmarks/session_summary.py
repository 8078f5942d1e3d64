"""The table a GPU session prints last: the issue's target rows, read from the files gpu_session.sh wrote.

    python benchmarks/session_summary.py OUT_DIR    # step_time.json, epoch_time.json, recipe.json, fast.json
    python benchmarks/session_summary.py --collect RUN_DIR OUT.json --stage NAME --stages stages.tsv
        # one file: a recipe run folder's report.json and metrics.jsonl, its stage's exit status and seconds
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

PAPER_EPOCHS = 160


def collect(run_dir: Path, out: Path, stage: str, stages: Path) -> None:
    report = run_dir / "report.json"
    metrics = run_dir / "metrics.jsonl"
    rows = [line.split("\t") for line in stages.read_text().splitlines()] if stages.exists() else []
    status, seconds, limit = next(([int(x) for x in row[1:4]] for row in reversed(rows) if row[0] == stage),
                                  (None, None, None))
    out.write_text(json.dumps({
        "stage": {"name": stage, "exit_status": status, "wall_s": seconds, "limit_s": limit},
        "report": json.loads(report.read_text()) if report.exists() else None,
        "metrics": ([json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                    if metrics.exists() else []),
    }, indent=1) + "\n")


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def recipe_cell(run: dict | None, limit_s: float) -> tuple[str, bool | None, float | None]:
    """(text, whether it finished within `limit_s`, final (pruned) accuracy) of a collected recipe run."""
    if run is None:
        return "not run", None, None
    stage, report = run["stage"], run["report"]
    if report is not None and stage["exit_status"] == 0:
        acc = report["accuracy"]
        text = (f"{stage['wall_s']} s wall ({report['seconds']['total']:.0f} s in run_experiment, train "
                f"{report['seconds']['train']:.0f} s); acc trained {_pct(acc['trained'])}, sparse "
                f"{_pct(acc['sparse'])}, pruned {_pct(acc['pruned'])}, recalibrated "
                f"{_pct(acc.get('recalibrated'))} ({report['split']})")
        return text, stage["wall_s"] <= limit_s, acc["pruned"]
    train = [m for m in run["metrics"] if m.get("phase") == "train"]
    if not train:
        status = stage["exit_status"]
        why = "stopped at its time limit" if status == 124 else f"failed (exit {status})"
        return f"{why} before its first epoch ended; see session.log", False, None
    steady = statistics.median([m["seconds"] for m in train[1:]] or [train[0]["seconds"]])
    text = (f"stopped (exit {stage['exit_status']}) after {len(train)} epochs in {stage['wall_s']} s; steady "
            f"epoch {steady:.2f} s, so {PAPER_EPOCHS} epochs ~ {PAPER_EPOCHS * steady:.0f} s of training")
    return text, False, None


def summary(out_dir: Path) -> str:
    step, epoch = _load(out_dir / "step_time.json"), _load(out_dir / "epoch_time.json")
    recipe, fast = _load(out_dir / "recipe.json"), _load(out_dir / "fast.json")
    lines = []
    env = (step or epoch or {}).get("environment")
    if env:
        lines.append(f"device {env['device_kind']} x{env['device_count']}, {env['date']}, "
                     + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    text, met, paper_acc = recipe_cell(recipe, 240)
    rows = [["paper recipe, VGG-19, 160 epochs, end to end", "<= 4 min", text, met]]
    derived = {(d["batch"], d["dtype"]): d for d in (step or {}).get("derived", [])}
    for dtype in ("float32", "bfloat16"):
        x = derived.get((64, dtype), {}).get("speedup_vs_torch")
        rows.append([f"palm_jax step vs PyTorch eager, batch 64, {dtype}", ">= 2.5x",
                     "not measured" if x is None else f"{x:.2f}x", None if x is None else x >= 2.5])
    for (batch, dtype), d in sorted(derived.items()):
        o = d["prox_overhead_pct"]
        rows.append([f"palm_prox overhead, batch {batch}, {dtype}", "<= 3%",
                     "not measured" if o is None else f"{o:+.2f}%", None if o is None else o <= 3])
    text, met, fast_acc = recipe_cell(fast, 90)
    if fast_acc is not None and paper_acc is not None:
        text += f"; {100 * (fast_acc - paper_acc):+.2f} pt vs the paper recipe"
        met = met and abs(fast_acc - paper_acc) <= 0.003
    elif met:
        met = None  # in time, but no paper-recipe accuracy to compare with
    rows.append(["fast recipe, 160 epochs, end to end", "<= 90 s, acc within 0.3 pt", text, met])
    share = None if epoch is None else epoch["input_share_pct"]
    rows.append(["input pipeline share of epoch time", "< 5%", "not measured" if epoch is None else
                 f"{share:.2f}% (host share {epoch['host_share_pct']:.2f}%, steady epoch "
                 f"{epoch['steady_epoch_s']:.2f} s, {epoch['data']})", None if share is None else share < 5])
    lines += ["", "| figure | target | measured | met |", "| --- | --- | --- | --- |"]
    verdict = {None: "-", True: "yes", False: "NO"}
    lines += [f"| {f} | {t} | {m} | {verdict[ok]} |" for f, t, m, ok in rows]
    if step:
        lines += ["", "| step | batch | dtype | ms/step | images/s |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['label']} | {r['batch']} | {r['dtype']} | {r['ms_per_step']:.3f} | "
                  f"{r['images_per_s']:.0f} |" for r in step["rows"]]
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("collect_to", type=Path, nargs="?")
    parser.add_argument("--collect", action="store_true", help="collect run folder OUT_DIR into COLLECT_TO")
    parser.add_argument("--stage", default="recipe")
    parser.add_argument("--stages", type=Path, default=Path("stages.tsv"))
    args = parser.parse_args(argv)
    if args.collect:
        collect(args.out_dir, args.collect_to, args.stage, args.stages)
    else:
        print(summary(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
