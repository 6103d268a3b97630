"""`python -m microvlm.hub_upload --model_dir D --eval_json E --repo_id ID`: see `microvlm/hub_upload/upload.py`."""

from .upload import main


main()
