"""CPU smoke runs, all at once: benchmarks/step_time.py and benchmarks/epoch_time.py with a tiny VGG,
benchmarks/prune_time.py on VGG-19 and benchmarks/inference_time.py --quick."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = ["--model-depth", "11", "--width-scale", "0.0625"]
COMMANDS = {
    "step": ["step_time.py", "--batch-sizes", "8", "--dtypes", "float32", "--steps", "2", "--repeats", "2",
             "--num-images", "64", *TINY],
    "epoch": ["epoch_time.py", "--num-images", "128", "--eval-images", "32", "--batch-size", "32",
              "--epochs", "2", "--repeats", "2", *TINY],
    "prune": ["prune_time.py", "--models", "vgg19", "--repeats", "1"],
    "inference": ["inference_time.py", "--quick"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {}
    for name, (script, *args) in COMMANDS.items():
        cmd = [sys.executable, str(BENCH / script), *args, "--out", str(tmp / f"{name}.json")]
        procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
        results[name] = (json.loads((tmp / f"{name}.json").read_text()), stdout)
    return results


def _last_table(stdout: str) -> list[list[str]]:
    lines = stdout.rstrip().splitlines()
    assert lines[-1].startswith("|"), "the table must be printed last"
    table = []
    for line in reversed(lines):
        if not line.startswith("|"):
            break
        table.insert(0, [cell.strip() for cell in line.strip("|").split("|")])
    return table


def test_step_time_rows_and_table(runs):
    result, stdout = runs["step"]
    rows = {(r["impl"], r["batch"], r["dtype"]): r for r in result["rows"]}
    assert set(rows) >= {("prox", 8, "float32"), ("plain", 8, "float32")}
    for row in rows.values():
        assert row["ms_per_step"] > 0 and len(row["repeat_ms"]) == 2
        assert row["images_per_s"] == pytest.approx(8 * 1000 / row["ms_per_step"])
    (derived,) = result["derived"]
    prox, plain = rows["prox", 8, "float32"]["ms_per_step"], rows["plain", 8, "float32"]["ms_per_step"]
    assert derived["prox_overhead_pct"] == pytest.approx(100 * (prox - plain) / plain)
    if importlib.util.find_spec("torch") is None:
        assert "torch not importable" in result["torch_skipped"] and derived["speedup_vs_torch"] is None
    else:
        assert ("torch", 8, "float32") in rows
    env = result["environment"]
    assert env["platform"] == "cpu" and env["versions"]["jax"] and "step_time.py" in env["command"]
    header, _, *body = _last_table(stdout)  # the derived table
    assert header[0] == "batch" and body[0][:3] == ["8", "float32", f"{derived['prox_overhead_pct']:+.1f}"]
    assert "palm_jax step + palm_prox" in stdout


def test_epoch_time_rows_and_table(runs):
    result, stdout = runs["epoch"]
    assert result["epochs"] == 2 and len(result["epoch_s"]) == 2
    assert result["steps_per_epoch"] == 128 // 32 and result["train_images"] == 128
    assert result["end_to_end_s"] >= sum(result["epoch_s"])
    for part in ("compute_s", "eval_s", "index_s", "augment_s", "steady_epoch_s"):
        assert result[part] > 0, part
    share = 100 * (result["index_s"] + result["augment_s"]) / result["steady_epoch_s"]
    assert result["input_share_pct"] == pytest.approx(share)
    table = _last_table(stdout)
    assert table[0] == ["figure", "value"]
    assert any(row[0] == "input pipeline share" for row in table)


def test_gpu_session_summary_reads_every_stage(runs, tmp_path):
    """session_summary.py (gpu_session.sh's last table): a run stopped at its limit, a finished one."""
    summary = _script_module("session_summary")
    for name in ("step", "epoch"):
        (tmp_path / f"{name}_time.json").write_text(json.dumps(runs[name][0]))
    stopped, finished = tmp_path / "run_stopped", tmp_path / "run_finished"
    stopped.mkdir(), finished.mkdir()
    epochs = "".join(json.dumps({"phase": "train", "epoch": e, "seconds": s}) + "\n"
                     for e, s in [(1, 30), (2, 2)])
    (stopped / "metrics.jsonl").write_text(epochs)
    (finished / "metrics.jsonl").write_text(epochs)
    report = {"accuracy": {"trained": 0.9, "sparse": 0.9, "pruned": 0.9012, "finetuned": None},
              "split": "val", "seconds": {"train": 60.0, "total": 70.0}}
    (finished / "report.json").write_text(json.dumps(report))
    (tmp_path / "stages.tsv").write_text("recipe\t124\t240\t240\nfast\t0\t80\t120\n")
    summary.collect(stopped, tmp_path / "recipe.json", "recipe", tmp_path / "stages.tsv")
    summary.collect(finished, tmp_path / "fast.json", "fast", tmp_path / "stages.tsv")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in summary.summary(tmp_path).splitlines()}
    paper = rows["paper recipe, VGG-19, 160 epochs, end to end"]
    assert "stopped (exit 124) after 2 epochs in 240 s" in paper and "~ 320 s" in paper
    assert paper.endswith("| NO |")
    fast = rows["fast recipe, 160 epochs, end to end"]
    assert "80 s wall" in fast and "pruned 90.12%" in fast and fast.endswith("| - |")  # no paper accuracy
    share = runs["epoch"][0]["input_share_pct"]
    assert f"| {share:.2f}% (host share" in rows["input pipeline share of epoch time"]
    assert "palm_prox overhead, batch 8, float32" in rows


def _script_module(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prune_time_exact_fold_keeps_the_logits(runs):
    result, stdout = runs["prune"]
    (row,) = result["rows"]
    assert row["model"] == "vgg19" and row["deviation"] < 1e-5 < row["closest_deviation"]
    before, exact, closest = row["bn_channels"]
    assert exact == closest + row["carrier_channels"] and row["carrier_channels"] > 0
    assert exact < before == 5504
    assert set(row["warm_split"]) == {"trace", "decide", "fold", "slice", "check"}
    assert row["warm_seconds"] > 0 and row["warm_cpu_seconds"] > 0 and _last_table(stdout)[-1][0] == "vgg19"


def test_inference_time_rows_for_both_prunes_dtypes_and_batches(runs):
    result, stdout = runs["inference"]
    rows = {(r["prune"], r["dtype"], r["batch"]): r for r in result["rows"]}
    dtypes = ("float32", "bfloat16")
    assert set(rows) == {(p, d, b) for p in ("NS 70%", "zeros") for d in dtypes for b in (1, 8)}
    for row in rows.values():
        assert row["unpruned_ms"] > 0 and row["pruned_ms"] > 0
        assert row["speedup"] == pytest.approx(row["unpruned_ms"] / row["pruned_ms"])
        assert row["params"][1] < row["params"][0] and row["flops"][1] < row["flops"][0]
    # NS's 70% removes more than the zero channels (half of the scales) do
    assert rows["NS 70%", "float32", 1]["channels"][1] < rows["zeros", "float32", 1]["channels"][1]
    assert result["device"] == result["env"]["device_kind"]
    assert _last_table(stdout)[-1][:4] == ["vgg11/16", "zeros", "bfloat16", "8"]
