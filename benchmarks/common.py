"""What the benchmark scripts share: model options, the environment record, JSON output and the table."""

import datetime
import json
import os
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # git-ignored


def add_model_args(parser) -> None:
    parser.add_argument("--model-depth", type=int, default=19, help="VGG depth (11, 13, 16, 19)")
    parser.add_argument("--width-scale", type=float, default=1.0,
                        help="multiply every NS channel width (e.g. 0.0625 for a CPU smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/<name>-<platform>-<date>.json)")


def vgg_widths(depth: int, scale: float) -> tuple[int, ...] | None:
    """The NS widths of VGG-`depth` times `scale` (None: the NS widths themselves)."""
    from palm_jax.models.vgg import VGG_CFG

    if scale == 1.0:
        return None
    return tuple(max(1, round(c * scale)) for c in VGG_CFG[depth] if c != "M")


def environment() -> dict:
    """Device, software versions, date and the command line: what RESULTS.md quotes next to each figure."""
    import jax

    device = jax.devices()[0]
    versions = {name: _version(name) for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch")}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join(sys.argv),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {k: v for k, v in versions.items() if v is not None},
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def timed(fn) -> float:
    """Wall seconds of `fn()`, which must block until its work is done."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_json(result: dict, out: Path | None, name: str, env: dict) -> Path:
    if out is None:
        stamp = env["date"].replace(" ", "_").replace(":", "")
        out = RESULTS_DIR / f"{name}-{env['platform']}-{stamp}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out


def print_table(headers: list[str], rows: list[list], title: str) -> None:
    """A Markdown table (pastes into RESULTS.md)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"
    print(f"\n{title}")
    print(line(headers))
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        print(line(row))
