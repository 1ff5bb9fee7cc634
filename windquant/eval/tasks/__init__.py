"""lm-eval task configs that read the zero-shot benchmarks from local files (``windquant eval --data-dir``).

The ``*.yaml`` files here are lm-eval's own task configs (same prompts, choices, targets and
metrics) with one change: the documents come from ``local.py`` instead of the Hugging Face Hub.
"""
