"""An OpenAI guided-diffusion (ADM) checkpoint → a stock diffusers `DDPMPipeline` folder.

guided-diffusion's `UNetModel` is, layer for layer, a `UNet2DModel` with the
configuration `models.adm_config` builds; converting it is renaming its
tensors and splitting each attention block's fused qkv convolution into
`to_q`/`to_k`/`to_v`. What the tensors say (widths, depth, attention levels,
learned Σ, resampling and time conditioning) is read from them; flags given
as guided-diffusion spells them are checked against them, and what a stock
`UNet2DModel` cannot express is refused. tests/model/test_convert_adm.py checks the
converted network against an independent forward pass of ADM.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, TYPE_CHECKING

from ..errors import InputError
from ..files import check_output_folder, file_sha256, replace_path
from ..layout import CARD_FILE, CARD_MODEL_ID_PLACEHOLDER, CONVERSION_FILE, MODEL_INDEX, SCHEDULER, UNET, is_conversion
from .adm_flags import PUBLISHED_RESULTS, flags_command_line
from .adm_weights import ADMConversion, convert_adm_state_dict, load_adm_state_dict

if TYPE_CHECKING:
    from huggingface_hub import ModelCard


# Everything a conversion writes: the DDPMPipeline folder (its model_index.json and components), the card and
# the record. A previous conversion holding anything else (evaluation.json, a user's notes) is not replaced.
CONVERSION_ENTRIES = frozenset({MODEL_INDEX, UNET, SCHEDULER, CARD_FILE, CONVERSION_FILE})
CARD_TEMPLATE = Path(__file__).with_name("adm_model_card_template.md")
LICENSE = "mit"  # guided-diffusion's code and released checkpoints
SOURCE_URL = "https://github.com/openai/guided-diffusion"
DOWNLOAD_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{name}"
PAPER_URL = "https://arxiv.org/abs/2105.05233"


def build_adm_model_card(source_name: str, sha256: str, flags: dict[str, Any], inferred: tuple[str, ...],
                         unet_config: dict[str, Any]) -> ModelCard:
    """The folder's model card: the source checkpoint (name, SHA-256), the flags, the licence (MIT) and the
    published FID, precision and recall where guided-diffusion gives them for that file."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    published = PUBLISHED_RESULTS.get(source_name)
    metrics = {"fid": "FID", "precision": "Precision", "recall": "Recall"}
    results = [
        EvalResult(task_type="unconditional-image-generation", dataset_type="lsun", dataset_name=published.dataset,
                   metric_type=key, metric_name=label, metric_value=getattr(published, key),
                   source_name="Diffusion Models Beat GANs on Image Synthesis (Dhariwal & Nichol, 2021)",
                   source_url=PAPER_URL)
        for key, label in metrics.items() if published is not None and getattr(published, key) is not None
    ]
    name = Path(source_name).stem
    card_data = ModelCardData(
        library_name="diffusers", pipeline_tag="unconditional-image-generation", license=LICENSE,
        tags=["diffusers", "unconditional-image-generation", "ddpm", "guided-diffusion", "adm"],
        model_name=f"guided-diffusion {name} (diffusers)", eval_results=results or None,
    )
    known = source_name in PUBLISHED_RESULTS
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE.read_text(), title=f"guided-diffusion `{source_name}` for diffusers",
        model_id=CARD_MODEL_ID_PLACEHOLDER, source_name=source_name, sha256=sha256, download_url=DOWNLOAD_URL.format(name=source_name) if known else None,
        source_url=SOURCE_URL, paper_url=PAPER_URL, command_line=flags_command_line(flags),
        inferred=", ".join(f"`--{n}`" for n in inferred) or "none", published=published,
        metrics=[(label, getattr(published, key)) for key, label in metrics.items()
                 if published is not None and getattr(published, key) is not None],
        resolution=unet_config["sample_size"], learn_sigma=flags["learn_sigma"],
        attention_order="new (q, k, v split first)" if flags["use_new_attention_order"] else
        "legacy (heads split before q, k, v)",
    )


def check_conversion_output(out_dir: str | os.PathLike) -> Path:
    """`out_dir` as a Path if a conversion may be written there: new, empty, or a previous conversion holding
    nothing but what a conversion writes (it is replaced whole, so anything else there would be lost)."""
    out_dir = check_output_folder(out_dir, "OUT_DIR")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"OUT_DIR {str(out_dir)!r} is a file: give a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return out_dir
    if not is_conversion(out_dir):  # only a previous conversion may be replaced
        raise InputError(f"OUT_DIR {str(out_dir)!r} is not empty and was not written by convert-adm: give a new "
                         "or empty folder")
    foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in CONVERSION_ENTRIES)
    if foreign:
        raise InputError(f"OUT_DIR {str(out_dir)!r} holds a previous conversion and also {', '.join(foreign)}, "
                         "which convert-adm did not write and a new conversion would delete: move them out of "
                         "it, or give a new folder")
    return out_dir


def write_conversion(conversion: ADMConversion, card: ModelCard, record: dict[str, Any],
                     out_dir: str | os.PathLike) -> Path:
    """Write the pipeline (safetensors), README.md and adm_conversion.json into `out_dir`.

    Everything is written into a temporary sibling first and moved into place
    at the end (`export.replace_path`), so an interrupted conversion never
    leaves a half-written OUT_DIR; a previous conversion there is replaced whole.
    """
    out_dir = check_conversion_output(out_dir).resolve()  # "." has no name to make a sibling's from
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.convert-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run that had this process id
    try:
        conversion.pipeline.save_pretrained(staging, safe_serialization=True)
        card.save(staging / CARD_FILE)
        (staging / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Put the finished conversion `staging` where `out_dir` is: the whole folder at once.

    Except where `out_dir` is (or holds) the working directory, as in `convert-adm CKPT .`: renaming it away
    would leave this process and the user's shell in a deleted folder, so the folder stays and each of its
    entries is replaced at once instead.
    """
    if not Path.cwd().is_relative_to(out_dir):
        replace_path(staging, out_dir)
        return
    for entry in sorted(staging.iterdir()):
        replace_path(entry, out_dir / entry.name)


def convert_adm(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                given: dict[str, Any] | None = None) -> ADMConversion:
    """Convert a guided-diffusion checkpoint file into a stock `DDPMPipeline` folder `out_dir`, with its card.

    `given` holds the guided-diffusion flags that were given (see
    `convert_adm_state_dict`). OUT_DIR is checked before the checkpoint is read.
    """
    check_conversion_output(out_dir)
    checkpoint = Path(checkpoint)
    conversion = convert_adm_state_dict(load_adm_state_dict(checkpoint), given)
    sha256 = file_sha256(checkpoint)
    card = build_adm_model_card(checkpoint.name, sha256, conversion.flags, conversion.inferred,
                                dict(conversion.pipeline.unet.config))
    record = {"source": checkpoint.name, "sha256": sha256, "flags": conversion.flags,
              "inferred_from_checkpoint": list(conversion.inferred)}
    write_conversion(conversion, card, record, out_dir)
    return conversion
