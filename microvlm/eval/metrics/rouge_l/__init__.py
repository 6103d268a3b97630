"""The `rouge_l` evaluate metric module (a package only so that setuptools installs its script)."""
