"""The Hugging Face Space (app.py, requirements.txt, README.md); installed as `lsun_ddpm.space`
so that `lsun-ddpm push-space` finds these files in any installation."""
