"""Learned Σ (hybrid loss) against fixed Σ (simple loss): FID/KID after the same training, at 25, 50 and 100 DDPM steps.

    python bench/learned_sigma.py --train_data_dir DIR --work_dir DIR --json bench-learned-sigma.json

Two runs of `train_unconditional.py` that differ only in `--learn_sigma`
(same model preset, data, seed, steps and learning-rate schedule; the
learned-Σ U-Net has 3 more output channels), then `lsun-ddpm evaluate` of
each with the ancestral DDPM sampler respaced to each number of steps, the
same seeds and the same reference statistics. The reference set is the
training images themselves, so with a few hundred images the FID is biased
upwards (it is comparable between the two runs, not with published numbers);
KID is unbiased. The runs and their evaluation folders stay in --work_dir.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
VARIANTS = {"fixed Σ (simple loss)": [], "learned Σ (hybrid loss)": ["--learn_sigma"]}


def train(run_dir: Path, extra: list[str], args: argparse.Namespace) -> float:
    """One training run into `run_dir` (skipped when it already finished); its wall time in seconds."""
    if (run_dir / "training_summary.json").is_file():
        return json.loads((run_dir / "training_summary.json").read_text())["wall_time_seconds"]
    command = [sys.executable, str(REPOSITORY / "train_unconditional.py"), "--model_preset", args.model_preset,
               "--train_data_dir", args.train_data_dir, "--output_dir", str(run_dir), "--seed", "0",
               "--train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1",
               "--max_train_steps", str(args.max_train_steps), "--learning_rate", str(args.learning_rate),
               "--lr_scheduler", "cosine", "--lr_warmup_steps", "100", "--checkpointing_steps",
               str(args.max_train_steps), "--save_images_steps", str(args.max_train_steps), "--save_model_steps",
               str(args.max_train_steps), "--ddpm_num_inference_steps", "100", "--logger", "none", *extra]
    subprocess.run(command, check=True)
    return json.loads((run_dir / "training_summary.json").read_text())["wall_time_seconds"]


def evaluate(run_dir: Path, steps: int, args: argparse.Namespace, work_dir: Path) -> dict:
    """`lsun-ddpm evaluate` of the run's EMA weights with `steps` DDPM steps; its evaluation.json."""
    out = work_dir / f"eval-{run_dir.name}-ddpm{steps}"
    if not (out / "evaluation.json").is_file():
        command = [sys.executable, "-m", "lsun_ddpm.cli", "evaluate", str(run_dir), "--scheduler", "ddpm",
                   "--num_inference_steps", str(steps), "--num_samples", str(args.num_samples), "--seed", "0",
                   "--train_data_dir", args.train_data_dir, "--num_reference", str(args.num_reference),
                   "--reference_stats", str(work_dir / "reference.npz"), "--batch_size", "50", "--run_dir", str(out)]
        if args.inception_weights:
            command += ["--inception_weights", args.inception_weights]
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(command, check=True)
    return json.loads((out / "evaluation.json").read_text())


# The arguments the runs and evaluations kept in --work_dir were made with (--steps only adds evaluations).
REUSED_ARGUMENTS = ("train_data_dir", "model_preset", "max_train_steps", "batch_size", "learning_rate", "num_samples",
                    "num_reference", "inception_weights")


def check_reusable(work_dir: Path, args: argparse.Namespace) -> None:
    """Record the arguments in a new --work_dir; refuse one whose runs were made with others (a rerun reuses
    finished runs and evaluations, which would then be reported under settings they were not made with)."""
    wanted = {name: getattr(args, name) for name in REUSED_ARGUMENTS}
    wanted["train_data_dir"] = str(Path(args.train_data_dir).resolve())
    record = work_dir / "arguments.json"
    if not record.is_file():
        record.write_text(json.dumps(wanted, indent=2) + "\n")
        return
    made_with = json.loads(record.read_text())
    different = [f"--{name} {made_with.get(name)} (now {value})" for name, value in wanted.items()
                 if made_with.get(name) != value]
    if different:
        sys.exit(f"--work_dir {work_dir} holds runs made with {', '.join(different)}: give a new --work_dir")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_data_dir", required=True, help="a folder of real images (e.g. LSUN bedrooms)")
    parser.add_argument("--work_dir", required=True, help="runs and evaluations go here; a rerun reuses them")
    parser.add_argument("--model_preset", default="small32")
    parser.add_argument("--max_train_steps", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_samples", type=int, default=200)
    parser.add_argument("--num_reference", type=int, default=50_000, help="all the training images when fewer")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--inception_weights", help="the FID Inception's weights offline (see `evaluate --help`)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    check_reusable(work_dir, args)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for name, extra in VARIANTS.items():
        run_dir = work_dir / ("learned" if extra else "fixed")
        train_seconds = train(run_dir, extra, args)
        for steps in args.steps:
            result = evaluate(run_dir, steps, args, work_dir)
            rows.append({"variant": name, "ddpm_steps": steps, "train_seconds": train_seconds,
                         **{key: result[key] for key in ("fid", "kid", "kid_std", "precision", "recall")}})

    print(f"\n{args.model_preset}, {args.max_train_steps} steps of batch {args.batch_size}, "
          f"{args.num_samples} samples per row ({started})")
    print(f"{'variant':<26} {'DDPM steps':>10} {'FID':>8} {'KID x1e3':>14} {'precision':>9} {'recall':>7}")
    for row in rows:
        spread = "" if row["kid_std"] is None else f" ± {1e3 * row['kid_std']:.2f}"  # None: a single subset
        kid = f"{1e3 * row['kid']:.2f}{spread}"
        print(f"{row['variant']:<26} {row['ddpm_steps']:>10} {row['fid']:>8.2f} {kid:>14} "
              f"{row['precision']:>9.3f} {row['recall']:>7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": started, "arguments": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
