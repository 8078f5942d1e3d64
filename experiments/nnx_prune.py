"""The whole NNX path on generated images, on a CPU in about a minute: define a Flax NNX CNN, train it with
`palm_prox` until BatchNorm scales reach zero, write xi in, prune it with one call, fine-tune the pruned
module, and print its parameter tree before and after.

    PYTHONPATH=. python experiments/nnx_prune.py [--steps 120] [--l1 1.6] [--finetune-steps 30]

The CNN (`SmallNet`, written here and known to no code of the library) has a residual add, a depthwise-
separable block, a concatenation, a zero-padded average pool and a Dense head after a flatten. Accuracies are
on 500 generated "val" images (`palm_jax.data.synthetic_dataset`, 16x16, 10 classes): the sparse model, the
pruned one (equal outputs), the pruned one with its BatchNorm statistics re-estimated (`recalibrate_bn`), and
after `--finetune-steps` steps of plain SGD (one epoch of the 2,000 training images at batch 64 is 32 steps).
"""

import argparse
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import palm_jax
from palm_jax.data import normalize, synthetic_dataset


class SmallNet(nnx.Module):
    """stem: relu(bn(conv 3x3)) = a; s = a + conv(relu(bn(conv(a))))                       (residual, 16)
    d = relu(bn(pw(relu(bn(dw(relu(bn_s(s))))))))                 (depthwise 3x3 then pointwise 1x1, 24)
    u = avg_pool(relu(bn_cat(concat[s, d])), 3x3, stride 2, zero-padded); logits = head(flatten(u))"""

    def __init__(self, num_classes=10, size=16, *, rngs):
        conv = lambda cin, cout, k, **kw: nnx.Conv(cin, cout, (k, k), use_bias=False, rngs=rngs, **kw)
        bn = lambda n: nnx.BatchNorm(n, momentum=0.9, rngs=rngs)  # PyTorch's default: statistics keep up
        self.stem, self.bn_stem = conv(3, 16, 3), bn(16)
        self.conv1, self.bn1 = conv(16, 16, 3), bn(16)
        self.conv2, self.bn_s = conv(16, 16, 3), bn(16)
        self.dw, self.bn_dw = conv(16, 16, 3, feature_group_count=16), bn(16)
        self.pw, self.bn_pw = conv(16, 24, 1), bn(24)
        self.bn_cat = bn(40)
        self.head = nnx.Linear(40 * (size // 2) ** 2, num_classes, rngs=rngs)

    def __call__(self, x):
        a = nnx.relu(self.bn_stem(self.stem(x)))
        s = a + self.conv2(nnx.relu(self.bn1(self.conv1(a))))
        d = nnx.relu(self.bn_dw(self.dw(nnx.relu(self.bn_s(s)))))
        d = nnx.relu(self.bn_pw(self.pw(d)))
        u = nnx.relu(self.bn_cat(jnp.concatenate([s, d], axis=-1)))
        u = nnx.avg_pool(u, (3, 3), (2, 2), padding="SAME", count_include_pad=True)
        return self.head(u.reshape(u.shape[0], -1))


def train(model, tx, images, labels, steps, batch=64, seed=0):
    """`steps` SGD steps on random batches in train mode; returns (optimizer, losses)."""
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    order = np.random.default_rng(seed).integers(0, len(images), (steps, batch))
    losses = [float(step(model, optimizer, images[i], labels[i])) for i in order]
    return optimizer, losses


@nnx.jit
def forward(model, x):
    return model(x)


def logits(model, images) -> np.ndarray:
    """Eval-mode outputs of a copy of `model` (the module itself keeps its mode); one compilation per
    module structure."""
    copy = nnx.clone(model)
    copy.eval()
    return np.asarray(forward(copy, images))


def param_tree(model) -> dict:
    """{path: shape} of the module's nnx.Params."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): tuple(v.shape) for path, v in flat}


def run(steps=120, l1=1.6, finetune_steps=30, lr=0.05, seed=0, verbose=True) -> dict:
    data = synthetic_dataset(num_train=2000, num_eval=500, image_size=16, seed=seed)
    train_x, train_y = normalize(jnp.asarray(data.train_images)), jnp.asarray(data.train_labels)
    val_x, val_y = normalize(jnp.asarray(data.eval_images)), jnp.asarray(data.eval_labels)
    say = print if verbose else (lambda *a, **k: None)
    clock = time.perf_counter()

    model = SmallNet(rngs=nnx.Rngs(seed))
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(lr, momentum=0.9),
                     palm_jax.palm_prox(l1=l1, beta=100.0, learning_rate=lr))
    optimizer, losses = train(model, tx, train_x, train_y, steps, seed=seed)
    nnx.update(model, palm_jax.sparse_scales(nnx.state(model, nnx.Param), optimizer.opt_state))  # xi in
    zeros = sum(int(jnp.sum(bn.scale[...] == 0)) for _, bn in nnx.iter_modules(model)
                if isinstance(bn, nnx.BatchNorm))
    say(f"trained {steps} steps (loss {losses[0]:.3f} -> {losses[-1]:.3f}); {zeros} BatchNorm scales are 0")

    result = palm_jax.prune(model, probe=val_x[:16])  # `model` is left as it is
    report = result.report
    gathering = [name for name, m in nnx.iter_modules(result.model) if type(m).__name__ == "GatherBatchNorm"]
    say(f"result.model: a {type(result.model).__name__}; BatchNorms reading a part of their input "
        f"(GatherBatchNorm): {', '.join('/'.join(map(str, n)) for n in gathering) or 'none'}")
    before, after = param_tree(model), param_tree(result.model)
    say(f"\n{'param':<18}{'before':>18}{'after':>18}")
    for name in before:
        say(f"{name:<18}{str(before[name]):>18}{str(after[name]):>18}")
    sparse, pruned = logits(model, val_x), logits(result.model, val_x)
    deviation = float(np.max(np.abs(pruned - sparse)) / np.max(np.abs(sparse)))
    say(f"params {report['params_before']} -> {report['params_after']}, FLOPs {report['flops_before']:.3g} "
        f"-> {report['flops_after']:.3g}; pruned = sparse on the val images to a relative {deviation:.1e}")

    recalibrated = palm_jax.recalibrate_bn(result.model, None, train_x[:640], batch_size=64)
    tuned = nnx.clone(recalibrated)
    _, tune_losses = train(tuned, optax.sgd(lr / 10, momentum=0.9), train_x, train_y, finetune_steps,
                           seed=seed + 1)
    outputs = {"sparse": sparse, "pruned": pruned, "recalibrated": logits(recalibrated, val_x),
               "finetuned": logits(tuned, val_x)}
    scores = {k: float(np.mean(v.argmax(-1) == np.asarray(val_y)) * 100) for k, v in outputs.items()}
    say("top-1 % on 500 generated val images: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))
    say(f"({time.perf_counter() - clock:.0f} s)")
    return {"zeros": zeros, "report": report, "deviation": deviation, "accuracy": scores, "losses": losses,
            "finetune_losses": tune_losses, "params": (before, after), "model": tuned}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps with palm_prox")
    parser.add_argument("--l1", type=float, default=1.6, help="palm_prox l1 (large: many channels reach 0)")
    parser.add_argument("--finetune-steps", type=int, default=30, help="fine-tuning steps after pruning")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.steps, args.l1, args.finetune_steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
