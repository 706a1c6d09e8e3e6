"""`lsun-ddpm sample` and `lsun-ddpm interpolate` once their flags are checked: the work.

Under `accelerate launch` each process does its share of the images or pairs on
its own device; image i depends only on (seed, i), so the result is the one a
single process gives, and the first process writes it.
"""

from __future__ import annotations

from pathlib import Path

from accelerate.utils import gather_object

from ..files import save_image
from ..hardware import is_compiled
from .figures import image_grid, labelled_side_by_side
from .interpolation import (Pair, choose_interpolation_steps, interpolate_pairs, load_interpolation_pipeline,
                            save_gif, strip)
from .loading import load_scheduler_config, load_unet, weights_to_use
from .sampling import (SamplingPlan, check_inference_steps, choose_sampler, generate, launched_process, progress_bar,
                       this_process_share)


def run_sample(args) -> None:
    """Sample `args.num_images` images of `args.model` into the grid `args.out` (and `args.out_dir`)."""
    args.scheduler, args.num_inference_steps = choose_sampler(args.model, args.scheduler, args.num_inference_steps)
    plan = SamplingPlan(args.scheduler, args.num_inference_steps, args.batch_size, args.bf16, args.torch_compile,
                        args.torch_compile_mode)
    config = load_scheduler_config(args.model)  # fails fast on a model that is not there
    check_inference_steps(plan, config)
    has_ema, chosen = weights_to_use(args.model, args.weights)
    # Under `accelerate launch` each process samples its share of the images, on its own device; image i
    # depends only on (seed, i), so the result is the one a single process gives.
    state = launched_process()
    share = this_process_share(args.num_images)
    panels = []
    for weights in (("raw", "ema") if chosen == "both" else (chosen,)):
        unet = load_unet(args.model, weights, has_ema).to(state.device)
        images = generate(unet, config, len(share), args.seed, plan,
                          progress_bar(f"sample ({weights}){share_note(state)}", state.is_main_process),
                          first_index=share.start)
        if args.out_dir:
            folder = Path(args.out_dir) / weights if args.weights == "both" else Path(args.out_dir)
            for index, image in zip(share, images):
                save_image(image, folder / f"{index:05d}.png")
        panels.append((weights, gather_object(images)))  # every process's share, in index order
    state.destroy_process_group()  # the last collective is done; a worker exiting with it alive may abort in gloo
    if not state.is_main_process:
        return
    grids = [image_grid(images) for _, images in panels]
    grid = grids[0] if len(grids) == 1 else labelled_side_by_side([("raw", grids[0]), ("EMA", grids[1])])
    save_image(grid, args.out)
    processes = f", {state.num_processes} processes" if state.num_processes > 1 else ""
    print(f"wrote {args.out} ({args.num_images} images, {chosen} weights, {plan.scheduler}, {plan.steps} steps, "
          f"seed {args.seed}{', compiled U-Net' if is_compiled(unet) else ''}{processes})")


def run_interpolate(args, pairs: list[Pair], t: int | str | None, num_train_timesteps: int) -> None:
    """Interpolate each of `pairs` at noise level `t` (None: the model's default) into the strip `args.out`
    (and the GIF `args.gif`)."""
    chosen = choose_interpolation_steps(args.model, t, args.num_inference_steps, num_train_timesteps)
    has_ema, _ = weights_to_use(args.model, args.weights)
    state = launched_process()  # under `accelerate launch`, each process interpolates its share of the pairs
    share = this_process_share(len(pairs))
    pipeline = load_interpolation_pipeline(args.model, args.weights, state.device, has_ema=has_ema)
    results = interpolate_pairs(
        pipeline, pairs[share.start:share.stop], chosen.t, args.frames, args.method, chosen.steps, args.seed,
        args.bf16, on_pair=lambda i, level: print(f"pair {i + 1}/{len(pairs)}: t = {level}", flush=True),
        first_index=share.start, endpoint_steps=chosen.endpoint_steps,
    )
    results = gather_object(results)  # every process's pairs, in order
    state.destroy_process_group()
    if not state.is_main_process:
        return
    save_image(strip(results), args.out)
    if args.gif:
        save_gif(results, args.gif)
    print(f"wrote {args.out}" + (f" and {args.gif}" if args.gif else ""))


def share_note(state) -> str:
    """What the main process's progress bar counts under a multi-process launch."""
    return f" (process 0's share of {state.num_processes})" if state.num_processes > 1 else ""
