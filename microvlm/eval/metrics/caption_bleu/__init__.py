"""The `caption_bleu` evaluate metric module (a package only so that setuptools installs its script)."""
