"""palm_jax.deploy: exported models give eval's logits in a process without the model's code; one-line errors
for bad export directories; the latency measurement's dict."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_prune import images, init, perturbed
from train_helpers import scratch_dir, tiny_run

from palm_jax import cli
from palm_jax.data import CIFAR_MEAN, CIFAR_STD
from palm_jax.deploy import (
    ExportError,
    export_checkpoint,
    export_model,
    latency_table,
    load_exported,
    measure_latency,
)
from palm_jax.deploy.latency import default_batches
from palm_jax.models import VGG, PreResNet
from palm_jax.pruning import load_pruned, prune, save_pruned

# Serve an export with the model code, Flax and the training code made unimportable.
FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "flax" or name.startswith(
                    ("palm_jax.models", "palm_jax.pruning", "palm_jax.train", "palm_jax.data")):
                raise ImportError(f"{name} is blocked in this process")

    sys.meta_path.insert(0, Blocked())
    import palm_jax

    serve = palm_jax.load_exported(sys.argv[1])
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], np.asarray(serve(x[:1])))
    np.save(sys.argv[4], np.asarray(serve(x)))
    print(json.dumps(serve.meta))
    """
)


def uint8_images(n=7, seed=0):
    """Random pixels over the whole 0-255 range, with a black and a white image among them."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    x[0], x[-1] = 0, 255
    return x


def eval_logits(model, variables, x_uint8):
    """What `eval` computes: the eval forward pass of (x / 255 - mean) / std, written out by hand here."""
    x = (x_uint8.astype(np.float32) / 255.0 - np.float32(CIFAR_MEAN)) / np.float32(CIFAR_STD)
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


@pytest.fixture(scope="module")
def pruned_export(tmp_path_factory):
    """A PreResNet-11 with half of its BN scales at zero, pruned, saved, and exported from that directory."""
    model, probe = PreResNet(depth=11), images(size=32)
    result = prune(model, perturbed(init(model, probe), np.random.default_rng(0)), probe=probe)
    tmp = tmp_path_factory.mktemp("deploy")
    save_pruned(tmp / "pruned", result)
    assert export_checkpoint(tmp / "pruned", tmp / "export") == tmp / "export"
    return tmp / "pruned", tmp / "export"


def test_export_serves_eval_logits_in_a_process_without_the_model_code(pruned_export, tmp_path):
    pruned, exported = pruned_export
    x = uint8_images()
    np.save(tmp_path / "x.npy", x)
    outputs = [tmp_path / "one.npy", tmp_path / "seven.npy"]
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(exported), str(tmp_path / "x.npy"), *map(str, outputs)],
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300,
    )
    assert done.returncode == 0, done.stderr
    model, variables, report = load_pruned(pruned)
    expected = eval_logits(model, variables, x)
    np.testing.assert_allclose(np.load(outputs[0]), expected[:1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(outputs[1]), expected, atol=1e-5, rtol=0)
    meta = json.loads(done.stdout.strip().splitlines()[-1])
    assert meta["input"] == {"shape": [None, 32, 32, 3], "dtype": "uint8", "mean": list(CIFAR_MEAN),
                             "std": list(CIFAR_STD), "normalisation": meta["input"]["normalisation"]}
    assert meta["output"]["shape"] == [None, 10] and meta["num_classes"] == 10
    assert meta["params"] == report["params_after"] and meta["flops"] == report["flops_after"]
    assert meta["platforms"] == ["cpu", "cuda"] and meta["jax_version"] == jax.__version__
    assert meta["description"]["kind"] == "pruned" and meta["description"]["checkpoint"] == str(pruned)


def test_served_inputs_must_be_uint8_batches(pruned_export):
    serve = load_exported(pruned_export[1])
    x = uint8_images(2)
    for bad, shown in [(x.astype(np.float32) / 255, "float32 [2, 32, 32, 3]"), (x[0], "uint8 [32, 32, 3]"),
                       (x[:, :16], "uint8 [2, 16, 32, 3]")]:
        with pytest.raises(ValueError, match=r"expected uint8 images of shape \[batch, 32, 32, 3\]") as info:
            serve(bad)
        assert shown in str(info.value) and "\n" not in str(info.value)
    np.testing.assert_array_equal(np.asarray(serve(jnp.asarray(x))), np.asarray(serve(x)))  # jax input too


def test_bfloat16_weights_round_trip(tmp_path):
    """Weights numpy cannot name (bfloat16) are stored as raw bits and come back as the same values."""
    model = VGG(depth=11, widths=(4, 8, 8, 8, 8, 8, 8, 8), dtype=jnp.bfloat16)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), init(model, images(size=32)))
    export_model(model, variables, tmp_path / "bf16", input_shape=(32, 32, 3), mean=CIFAR_MEAN, std=CIFAR_STD)
    stored = np.load(tmp_path / "bf16" / "weights.npz", allow_pickle=False)
    kernel = np.asarray(variables["params"]["conv0"]["kernel"])
    np.testing.assert_array_equal(stored["params/conv0/kernel"], kernel.view(np.uint16))
    x = uint8_images(3)
    out = np.asarray(load_exported(tmp_path / "bf16")(x))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out, eval_logits(model, variables, x), atol=1e-5, rtol=0)


def one_line_error(path) -> str:
    with pytest.raises(ExportError) as info:
        load_exported(path)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    return str(info.value)


def edited_copy(source, target, edit_meta=None, edit_files=None):
    shutil.copytree(source, target)
    if edit_files:
        edit_files(target)
    if edit_meta:
        meta = json.loads((target / "exported.json").read_text())
        edit_meta(meta)
        (target / "exported.json").write_text(json.dumps(meta))
    return target


def test_foreign_corrupt_and_truncated_exports_give_one_line_errors(pruned_export, tmp_path):
    exported = pruned_export[1]
    assert "not a directory" in one_line_error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no exported.json" in one_line_error(tmp_path / "empty")
    assert "no exported.json (make an export with" in one_line_error(pruned_export[0])  # a pruned model
    foreign = edited_copy(exported, tmp_path / "foreign", lambda m: m.update(format="onnx"))
    assert "no format" in one_line_error(foreign)
    newer = edited_copy(exported, tmp_path / "v2", lambda m: m.update(version=2))
    assert "version 2, this palm_jax reads version 1" in one_line_error(newer)
    (foreign / "exported.json").write_bytes(b"\x00\xff not json")
    assert "unreadable exported.json" in one_line_error(foreign)
    no_sums = edited_copy(exported, tmp_path / "nosum", lambda m: m.pop("sha256"))
    assert "lacks a field" in one_line_error(no_sums)

    def truncate(directory):
        blob = (directory / "model.jax").read_bytes()
        (directory / "model.jax").write_bytes(blob[: len(blob) // 2])

    assert "model.jax does not match its sha256" in one_line_error(edited_copy(exported, tmp_path / "t", None,
                                                                               truncate))

    def resum(meta, directory):  # a truncated file whose checksum was updated too: the parser must say so
        from palm_jax.deploy.export import _sha256

        meta["sha256"] = {name: _sha256(directory / name) for name in meta["sha256"]}

    target = edited_copy(exported, tmp_path / "t2", None, truncate)
    edited_copy(target, tmp_path / "t3", lambda m: resum(m, target))
    assert "model.jax does not deserialize" in one_line_error(tmp_path / "t3")

    def other_weights(directory):
        with np.load(directory / "weights.npz") as stored:
            arrays = {name: stored[name] for name in stored.files}
        arrays["params/fc/bias"] = np.zeros(11, np.float32)
        np.savez(directory / "weights.npz", **arrays)

    target = edited_copy(exported, tmp_path / "w", None, other_weights)
    edited_copy(target, tmp_path / "w2", lambda m: resum(m, target))
    assert "params/fc/bias is float32[11], model.jax takes float32[10]" in one_line_error(tmp_path / "w2")
    missing = edited_copy(exported, tmp_path / "m", None, lambda d: (d / "weights.npz").unlink())
    assert "no weights.npz" in one_line_error(missing)


def test_other_platforms_only_and_occupied_directories_are_refused(tmp_path):
    model = VGG(depth=11, widths=(4,) * 8)
    variables = init(model, images(size=32))
    common = dict(input_shape=(32, 32, 3), mean=CIFAR_MEAN, std=CIFAR_STD)
    export_model(model, variables, tmp_path / "gpu", platforms=("cuda",), **common)
    assert "exported for cuda, this process runs on cpu" in one_line_error(tmp_path / "gpu")

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_model(model, variables, mine, **common)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    export_model(model, variables, mine, force=True, **common)
    assert (mine / "notes.txt").read_text() == "keep me"  # --force replaces the export files only
    x = uint8_images(2)
    served = np.asarray(load_exported(mine)(x))
    np.testing.assert_allclose(served, eval_logits(model, variables, x), atol=1e-5, rtol=0)
    with pytest.raises(ExportError, match=r"input_shape must be \(H, W, C\) with C mean"):
        export_model(model, variables, tmp_path / "bad", input_shape=(32, 32, 3), mean=(0.5,), std=(0.5,))


def test_cli_exports_a_trained_run_and_its_pruned_model(capsys):
    from palm_jax.train.experiment import load_trained

    run_dir, _ = tiny_run()
    out = scratch_dir("export")
    x = uint8_images(5)
    _, state, epoch = load_trained(run_dir)
    for checkpoint, expected in [
        (run_dir, eval_logits(state.apply_fn.model, state.variables(), x)),
        (run_dir / "pruned", eval_logits(*load_pruned(run_dir / "pruned")[:2], x)),
    ]:
        target = out / checkpoint.name
        assert cli.main(["export", str(checkpoint), "--out", str(target)]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"exported: {target}")
        serve = load_exported(target)
        np.testing.assert_allclose(np.asarray(serve(x)), expected, atol=1e-5, rtol=0)
    description = load_exported(out / run_dir.name).meta["description"]
    assert description == {"checkpoint": str(run_dir.absolute()), "run": str(run_dir.absolute()),
                           "dataset": "synthetic", "kind": "trained", "epoch": epoch}

    assert cli.main(["export", str(run_dir / "pruned"), "--out", str(out / "pruned")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir / "pruned"), "--out", str(out / "pruned"), "--force"]) == 0
    assert cli.main(["export", str(out), "--out", str(out / "x")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "neither a run directory" in error[0]


def test_latency_dict_and_table():
    before = VGG(depth=11, widths=(8, 16, 16, 16, 16, 16, 16, 16))
    after = before.clone(widths=(4, 8, 8, 8, 8, 8, 8, 8))
    x = images(size=32)
    latency = measure_latency((before, init(before, x)), (after, init(after, x)), batches=(1, 3),
                              budget_s=0.2, min_repeats=3, max_repeats=5)
    assert json.loads(json.dumps(latency)) == latency
    assert latency["device"] == jax.devices()[0].device_kind and latency["platform"] == "cpu"
    assert latency["dtype"] == "float32" and set(latency["batches"]) == {"1", "3"}
    for row in latency["batches"].values():
        assert row["before_ms"] > 0 and row["after_ms"] > 0 and 3 <= row["repeats"] <= 5
        assert row["speedup"] == pytest.approx(row["before_ms"] / row["after_ms"])
    lines = latency_table(latency).splitlines()
    row = latency["batches"]["3"]
    assert lines[-1] == (f"| 3 | {row['before_ms']:.2f} | {row['after_ms']:.2f} | {row['speedup']:.2f}x | "
                         f"{3e3 / row['before_ms']:,.0f} | {3e3 / row['after_ms']:,.0f} |")
    assert default_batches("cpu") == (1, 64) and default_batches("cuda") == (1, 256)
    with pytest.raises(ValueError, match="batches must be positive ints"):
        measure_latency((before, None), (after, None), batches=(0,))


def test_prune_reports_latency_only_on_request():
    from flax import nnx
    from test_prune_nnx import Net, sparsify

    model = VGG(depth=11, widths=(8, 16, 16, 16, 16, 16, 16, 16))
    x = images(size=32)
    variables = perturbed(init(model, x), np.random.default_rng(0))
    options = {"batches": (1, 2), "budget_s": 0.1, "min_repeats": 2, "max_repeats": 3}
    assert "latency" not in prune(model, variables, probe=x).report  # off by default
    linen = prune(model, variables, probe=x, latency=options).report
    net = sparsify(Net(rngs=nnx.Rngs(0)), seed=3)
    nnx_report = prune(net, probe=images(size=8), latency=options).report
    for report in (linen, nnx_report):
        latency = report["latency"]
        assert set(latency["batches"]) == {"1", "2"} and latency["platform"] == "cpu"
        for row in latency["batches"].values():
            assert row["before_ms"] > 0 and row["after_ms"] > 0 and 2 <= row["repeats"] <= 3
            assert row["speedup"] == pytest.approx(row["before_ms"] / row["after_ms"])
    with pytest.raises(ValueError, match="latency must be True, False or a dict"):
        prune(model, variables, probe=x, latency="yes")
