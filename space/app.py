"""Hugging Face Space: generate LSUN bedrooms and interpolate between them.

    MODEL_ID=path/or/user/model python space/app.py

All logic lives in `lsun_ddpm.publish.app`; GRADIO_SERVER_NAME and GRADIO_SERVER_PORT
choose the address.
"""

from lsun_ddpm.publish.app import main

if __name__ == "__main__":
    main()
