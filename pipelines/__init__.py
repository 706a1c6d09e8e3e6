"""Pipelines that users load with `DiffusionPipeline.from_pretrained(..., custom_pipeline=FILE)`.

Installed as `lsun_ddpm.pipelines`; each file stands alone (torch + diffusers only).
"""
