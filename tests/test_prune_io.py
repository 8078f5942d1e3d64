"""save_pruned / load_pruned: a round trip in a fresh process (a model whose BNs gather), and one-line errors
for bad directories."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_prune import UserNet, images, init, logits, perturbed

from palm_jax.models import PreResNet
from palm_jax.pruning import PrunedCheckpointError, load_pruned, prune, save_pruned

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    import palm_jax

    assert "palm_jax.models" not in sys.modules
    result = palm_jax.load_pruned(sys.argv[1])
    assert "palm_jax.models" in sys.modules  # imported through the class path saved in the JSON
    forward = jax.jit(lambda v, x: result.model.apply(v, x, train=False))
    out = forward(result.variables, np.load(sys.argv[2]))
    np.save(sys.argv[3], np.asarray(out))
    print(json.dumps({"widths": result.model.widths, "selections": result.model.selections,
                      "report": result.report}))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, x = PreResNet(depth=11), images(size=32)
    variables = perturbed(init(model, x), np.random.default_rng(0))
    result = prune(model, variables, probe=x)
    path = tmp_path_factory.mktemp("pruned") / "preresnet11"
    save_pruned(path, result)
    return path, result, x


def test_round_trip_in_a_fresh_process(saved, tmp_path):
    path, result, x = saved
    np.save(tmp_path / "x.npy", np.asarray(x))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path / "x.npy"), str(tmp_path / "out.npy")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert tuple(loaded["widths"]) == result.model.widths
    assert result.model.selections is not None  # a gathering model (its BNs read parts of the stream)
    as_tuples = lambda selections: tuple(None if s is None else tuple(s) for s in selections)
    assert as_tuples(loaded["selections"]) == result.model.selections
    assert loaded["report"]["params_after"] == result.report["params_after"]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), logits(result.model, result.variables, x),
                               atol=1e-5, rtol=0)


def test_user_model_round_trip(tmp_path):
    model, x = UserNet(kernel=1), images()
    result = prune(model, perturbed(init(model, x), np.random.default_rng(1)), probe=x)
    save_pruned(tmp_path / "user", result)
    loaded = load_pruned(tmp_path / "user")
    assert loaded.model == result.model
    np.testing.assert_array_equal(logits(loaded.model, loaded.variables, x),
                                  logits(result.model, result.variables, x))
    with pytest.raises(ValueError, match="not empty"):
        save_pruned(tmp_path / "user", result)


def copy_with(path, tmp_path, edit):
    """A copy of the saved directory with its JSON description changed by `edit(meta)`."""
    target = tmp_path / "edited"
    shutil.copytree(path, target)
    meta = json.loads((target / "pruned_model.json").read_text())
    edit(meta)
    (target / "pruned_model.json").write_text(json.dumps(meta))
    return target


def one_line_error(path) -> str:
    with pytest.raises(PrunedCheckpointError) as info:
        load_pruned(path)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    return str(info.value)


def test_foreign_and_corrupt_directories_give_one_line_errors(saved, tmp_path):
    path, _, _ = saved
    (tmp_path / "empty").mkdir()
    assert "no pruned_model.json" in one_line_error(tmp_path / "empty")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pruned_model.json").write_text(json.dumps({"format": "something else"}))
    assert "format" in one_line_error(foreign)
    (foreign / "pruned_model.json").write_bytes(b"\x00\xff not json")
    assert "unreadable" in one_line_error(foreign)

    def unknown_class(meta):
        meta["module"] = "no_such_package.models:Net"

    assert "cannot import" in one_line_error(copy_with(path, tmp_path / "a", unknown_class))

    def not_a_module(meta):
        meta["module"] = "subprocess:Popen"

    assert "cannot import the Flax module" in one_line_error(copy_with(path, tmp_path / "a2", not_a_module))

    def bad_fields(meta):
        meta["fields"]["widths"] = [16, 8]

    assert "rejects the saved fields" in one_line_error(copy_with(path, tmp_path / "b", bad_fields))

    def other_widths(meta):  # a valid model whose variables are not the saved ones
        meta["fields"]["widths"] = [w + 1 if i == 1 else w for i, w in enumerate(meta["fields"]["widths"])]

    assert "do not fit PreResNet" in one_line_error(copy_with(path, tmp_path / "c", other_widths))

    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "variables")
    assert "no variables/" in one_line_error(broken)
    shutil.copytree(path / "variables", broken / "variables")
    for item in (broken / "variables").iterdir():
        if item.name != "_CHECKPOINT_METADATA":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    assert "no readable Orbax checkpoint" in one_line_error(broken)
