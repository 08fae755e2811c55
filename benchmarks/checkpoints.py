"""mlx-lm's conversions in mlx-mla, and ours in mlx-lm: the table of docs/checkpoints.md.

For each family and conversion: mlx-lm's converter (in-process) writes a folder from a tiny random
checkpoint; our model on both attention paths is compared with mlx-lm's own model on that folder
(largest logit difference relative to the largest logit, greedy tokens over a short decode).
Then our convert's output of the same checkpoint is loaded by mlx_lm.utils.load_model.

    python benchmarks/checkpoints.py [--families deepseek_v2 ...] [--conversions "4-bit g64" ...]
"""

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/profile.py would shadow the standard library's profile, which torch imports.
sys.path[0:1] = [str(ROOT / "tests"), str(ROOT)]

import mlx_lm.utils  # noqa: E402
import test_mlx_lm_checkpoints as checks  # noqa: E402

DEFAULT_OUTPUT = ROOT / "results" / "checkpoints.json"


def row(root: Path, family: str, conversion: str) -> dict:
    src = checks.hf_checkpoint(family, root / f"hf-{family}")
    name = conversion.replace(" ", "_").replace(",", "")
    out = {"family": family, "conversion": conversion}
    try:
        path = checks.mlx_lm_folder(src, conversion, root / f"{family}-{name}")
        reference, tol = checks.references(path, conversion)
    except Exception as e:
        return out | {"mlx_lm": f"{type(e).__name__}: {str(e)[:120]}"}
    out["tolerance"] = tol
    for attention in ("mla", "mha"):
        try:
            worst, differ, clear = checks.compare(path, attention, reference, tol)
            out[attention] = {"error": worst, "greedy_differ": differ, "clear": clear}
        except Exception as e:
            out[attention] = {"failed": f"{type(e).__name__}: {str(e)[:160]}"}
            traceback.print_exc()
    return out


def ours_in_mlx_lm(root: Path, family: str, conversion: str) -> dict:
    src = checks.hf_checkpoint(family, root / f"hf-{family}")
    out = {"family": family, "conversion": conversion}
    try:
        path = checks.our_folder(src, conversion, root / f"ours-{family}-{conversion}")
        return out | {"error": checks.mlx_lm_gives_our_logits(path)}
    except Exception as e:
        return out | {"failed": f"{type(e).__name__}: {str(e)[:160]}"}


def summary(rows: list[dict], families: list[str]):
    """The table above in one row per family: the largest difference over a group of conversions
    and both paths, and the decode steps whose greedy token differs (if any)."""
    groups = {
        "float32": ["float32"],
        "float16 (mlx-lm's own)": ["float16"],
        "bfloat16 (mlx-lm's own)": ["bfloat16"],
        "affine 2-8 bits, g32/64/128": [c for c in checks.CONVERSIONS if "-bit g" in c][:18],
        "mxfp4 / mxfp8 / nvfp4": ["mxfp4", "mxfp8", "nvfp4"],
        "mixed_2_6 / 3_4 / 3_6 / 4_6": list(checks.mlx_lm_convert.QUANT_RECIPES),
        "quantization only": ["4-bit g64, quantization only"],
    }
    print(
        "\nIn one row per family (largest over the group and both paths; greedy steps differing)\n"
    )
    print("| family | " + " | ".join(groups) + " |")
    print("|---|" + "---|" * len(groups))
    for family in families:
        cells = []
        for names in groups.values():
            chosen = [r for r in rows if r["family"] == family and r["conversion"] in names]
            paths = [r.get(a, {}) for r in chosen for a in ("mla", "mha")]
            if not chosen or any("error" not in p for p in paths):
                cells.append("failed" if chosen else "")
                continue
            cell = f"{max(p['error'] for p in paths):.1e}"
            if names[0] in checks.HALF_DTYPES:
                cell += f" ({chosen[0]['tolerance'] / checks.HALF_FACTOR:.1e})"
            differ = sum(p["greedy_differ"] for p in paths)
            cells.append(cell + (f", {differ} greedy" if differ else ""))
        print(f"| {family} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(checks.FAMILIES))
    parser.add_argument("--conversions", nargs="+", default=list(checks.CONVERSIONS))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    for ours, theirs in checks.MLX_LM_ALIASES.items():
        mlx_lm.utils.MODEL_REMAPPING[ours] = theirs
    rows, start = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            for conversion in args.conversions:
                rows.append(row(Path(tmp), family, conversion))
                print(json.dumps(rows[-1]), flush=True)
        ours = [
            ours_in_mlx_lm(Path(tmp), family, conversion)
            for family in args.families
            for conversion in checks.OUR_CONVERSIONS
        ]
    print(
        f"\n{len(rows) + len(ours)} folders in {time.time() - start:.0f} s, load {os.getloadavg()}"
    )
    print("\nmlx-lm's conversions in mlx-mla: largest logit difference from mlx-lm's model on the")
    print("same folder, relative to its largest logit, over a prompt and 6 greedy decode steps;")
    print("16-bit folders against mlx-lm's model in float32 on the same weights, beside the")
    print("16-bit mlx-lm model's own deviation from it. Greedy: steps whose token differs (none")
    print("where the top two are further apart than the tolerance).\n")
    print("| family | conversion | mla | mha | mlx-lm's own (16-bit) | greedy differs mla/mha |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for attention in ("mla", "mha"):
            a = r.get(attention, {})
            cells.append(f"{a['error']:.1e}" if "error" in a else a.get("failed", r.get("mlx_lm")))
        own = (
            f"{r['tolerance'] / checks.HALF_FACTOR:.1e}"
            if r["conversion"] in checks.HALF_DTYPES
            else ""
        )
        greedy = "/".join(str(r.get(a, {}).get("greedy_differ", "-")) for a in ("mla", "mha"))
        print(f"| {r['family']} | {r['conversion']} | {cells[0]} | {cells[1]} | {own} | {greedy} |")
    summary(rows, args.families)
    print("\nOur convert's output loaded by mlx_lm.utils.load_model: largest logit difference from")
    print("ours (both paths), relative to the largest logit\n")
    print("| family | " + " | ".join(checks.OUR_CONVERSIONS) + " |")
    print("|---|" + "---|" * len(checks.OUR_CONVERSIONS))
    for family in args.families:
        cells = [
            f"{r['error']:.1e}" if "error" in r else r["failed"]
            for r in ours
            if r["family"] == family
        ]
        print(f"| {family} | " + " | ".join(cells) + " |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"mlx_lm_folders": rows, "ours_in_mlx_lm": ours}, indent=1))


if __name__ == "__main__":
    main()
