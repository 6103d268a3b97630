"""Hub sharing tooling (not shipped with saved models): `upload.py` builds the upload folder and model card and
uploads it; run as `python -m microvlm.hub_upload`."""
